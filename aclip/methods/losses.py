"""A-CLIP losses: CLIP InfoNCE, SigLIP, SimCLR NT-Xent and BYOL, with cross-rank feature gathering.

Why the local-loss form gives the exact global gradient
-------------------------------------------------------
Let W ranks each hold n rows (features x_r, r = 0..W-1) of a global batch of N = W*n rows, and let
the global loss be a mean over the N rows, L = (1/N) sum_i l_i(x_0, ..., x_{W-1}) (for InfoNCE,
row i's cross-entropy against all N columns, averaged over the two directions). Rank r computes
the *local* loss L_r = (1/n) sum_{i in rows of r} l_i, using every rank's features gathered by
``torch.distributed.nn.functional.all_gather``; so (1/W) sum_r L_r = L exactly (this is what the
tests check in a 2-process gloo run).

Gradients. The gathered copies of x_r on the other ranks are autograd nodes: the backward of that
all_gather sums, over all ranks, the gradient that reached each rank's copy of x_r and returns it
to rank r (a reduce-scatter with SUM). Hence after ``L_r.backward()`` on every rank, rank r holds

    g_r = d(sum_s L_s) / d x_r = W * dL / d x_r,

i.e. W times the global gradient for its own rows. The parameters θ are replicated; rank r
back-propagates g_r through its own rows only, giving G_r = (dx_r/dθ)^T g_r, and DDP/DeepSpeed
average the parameter gradients over ranks: (1/W) sum_r G_r = sum_r (dx_r/dθ)^T dL/dx_r = dL/dθ,
the exact single-process gradient of the global loss. (Without gradients through the gather,
each rank would only see its own rows' terms and the average would be missing the cross terms.)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _upcast(x: Tensor) -> Tensor:
    """Half-precision tensors to float32 (for stable normalisation/softmax); others unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate every rank's ``x`` (same shape on all ranks) along dim 0, keeping gradients.

    Returns (gathered, offset) where ``offset`` is the index of this rank's first row in
    ``gathered``. Identity and offset 0 when torch.distributed is not initialised or has a single
    process.
    """
    rank, world_size = _world()
    if world_size == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # torch marks this autograd all_gather deprecated; it is the one the design mandates.
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(x)
    return torch.cat(parts, dim=0), rank * x.shape[0]


def clip_infonce(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale_exp: Tensor,
    all_text: Tensor | None = None,
    label_smoothing: float = 0.0,
    gathered_grad: bool = True,
) -> Tensor:
    """Symmetric CLIP InfoNCE on L2-normalised embeddings, gathered across ranks.

    This rank's image rows are scored against all texts and its text rows against all images;
    labels are ``offset + arange(n)``; the loss is (CE_image + CE_text) / 2. On one process this is
    ``open_clip.loss.ClipLoss()``; the mean over ranks equals the 1-process loss on the whole batch.
    ``all_text`` is ``gather_with_grad(text_emb)[0]`` when the caller already has it (several
    views share one text gather). ``label_smoothing`` is cross-entropy's, over the gathered
    columns (Alpha-CLIP's official code: 0.1).

    ``gathered_grad=False`` gives the gathered columns (every rank's features, this rank's
    included) no gradient, as Alpha-CLIP's official code gathers them (see
    :func:`no_grad_columns`): the loss value is the same, but each row's features are trained
    only by their own row's term (an image by image->text, a caption by text->image).
    """
    all_image, offset = gather_with_grad(image_emb)
    if all_text is None:
        all_text, _ = gather_with_grad(text_emb)
    if not gathered_grad:
        all_image, all_text = no_grad_columns(all_image), no_grad_columns(all_text)
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
    logits_image = logit_scale_exp * image_emb @ all_text.t()
    logits_text = logit_scale_exp * text_emb @ all_image.t()
    ce_image = F.cross_entropy(logits_image, labels, label_smoothing=label_smoothing)
    ce_text = F.cross_entropy(logits_text, labels, label_smoothing=label_smoothing)
    return (ce_image + ce_text) / 2


def no_grad_columns(gathered: Tensor) -> Tensor:
    """Gathered features as Alpha-CLIP's official code uses them: without gradient.

    Official code (SunzeY/AlphaCLIP): ``train/utils.py:11-27``, ``concat_all_gather`` is
    ``@torch.no_grad()`` around ``torch.distributed.all_gather``; ``train/train/
    train_grit_1m.py:100-104`` scores ``image_features @ text_feat_all.T`` (image->text) and
    ``image_feat_all @ text_features.T`` (text->image), both at ``logit_scale.exp()`` and
    averaged at lines 118-121. That script always runs distributed (``init_process_group`` at
    line 329, DDP at 61, ``dist.get_rank()`` unguarded at 127), so even on one GPU the gathered
    copy, this rank's own rows included, has no gradient; we follow that at any world size.
    With the text tower frozen, only the image->text term trains the images.
    """
    return gathered.detach()


def multi_view_infonce(
    image_emb_views: list[Tensor],
    text_emb: Tensor,
    logit_scale_exp: Tensor,
    label_smoothing: float = 0.0,
    gathered_grad: bool = True,
) -> Tensor:
    """Mean over views of :func:`clip_infonce` (view v's images against the captions), with one
    gather of the text features for all views; ``gathered_grad`` as in :func:`clip_infonce`."""
    all_text, _ = gather_with_grad(text_emb)
    per_view = [
        clip_infonce(emb, text_emb, logit_scale_exp, all_text, label_smoothing, gathered_grad)
        for emb in image_emb_views
    ]
    return torch.stack(per_view).mean()


def siglip(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale_exp: Tensor,
    logit_bias: Tensor,
    all_text: Tensor | None = None,
) -> Tensor:
    """SigLIP's sigmoid loss (Zhai et al. 2023) on L2-normalised embeddings, this rank's images
    against every rank's captions.

    loss = -(1/n) sum_ij logsigmoid(z_ij (t x_i . y_j + b)), i over this rank's n images, j over
    all gathered captions, z_ij = +1 for an image's own caption and -1 for every other (other
    ranks' captions are negatives only): open_clip ``loss.py`` ``SigLipLoss`` summed over its
    rank blocks, the same normalisation (this rank's batch size). open_clip exchanges the text
    blocks around a ring with gradients (``neighbour_exchange_bidir_with_grad``); the
    ``all_gather`` with gradients here sends each caption the same sum of every rank's terms, so
    loss and gradients are open_clip's (tests/test_siglip.py, 1 and 2 ranks). The mean over
    ranks equals the 1-process loss on the whole batch (the module docstring's argument).
    ``all_text`` is ``gather_with_grad(text_emb)[0]`` when the caller already has it.
    """
    n = image_emb.shape[0]
    if all_text is None:
        all_text, _ = gather_with_grad(text_emb)
    offset = _world()[0] * text_emb.shape[0]  # this rank's captions in the gathered columns
    logits_BN = logit_scale_exp * image_emb @ all_text.t() + logit_bias
    rows = torch.arange(n, device=image_emb.device)
    signs_BN = -torch.ones_like(logits_BN)
    signs_BN[rows, rows + offset] = 1.0
    return -F.logsigmoid(signs_BN * logits_BN).sum() / n


def multi_view_siglip(
    image_emb_views: list[Tensor], text_emb: Tensor, logit_scale_exp: Tensor, logit_bias: Tensor
) -> Tensor:
    """Mean over views of :func:`siglip` (view v's images against the captions), with one
    gather of the text features for all views."""
    all_text, _ = gather_with_grad(text_emb)
    per_view = [
        siglip(emb, text_emb, logit_scale_exp, logit_bias, all_text) for emb in image_emb_views
    ]
    return torch.stack(per_view).mean()


def contrastive_views(
    image_emb_views: list[Tensor],
    text_emb: Tensor,
    logit_scale_exp: Tensor,
    logit_bias: Tensor | None = None,
) -> Tensor:
    """The contrastive term of ``loss.contrastive``: :func:`multi_view_siglip` when the model
    has a logit bias (a siglip model), else :func:`multi_view_infonce`."""
    if logit_bias is None:
        return multi_view_infonce(image_emb_views, text_emb, logit_scale_exp)
    return multi_view_siglip(image_emb_views, text_emb, logit_scale_exp, logit_bias)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR NT-Xent between two different views, gathered across ranks.

    ``z1``/``z2`` are the projections of the same n local samples under two views (normalised
    here). Over the global 2N rows, each row's positive is the same sample in the other view and
    its negatives are all the other 2N - 2 rows; the self-similarity is masked out. The loss is the
    mean cross-entropy over this rank's 2n rows (the mean over ranks is the global mean).
    """
    z1 = F.normalize(_upcast(z1), dim=-1)
    z2 = F.normalize(_upcast(z2), dim=-1)
    all_z1, offset = gather_with_grad(z1)
    all_z2, _ = gather_with_grad(z2)
    n, total = z1.shape[0], all_z1.shape[0]
    queries = torch.cat([z1, z2], dim=0)  # [2n, d]
    keys = torch.cat([all_z1, all_z2], dim=0)  # [2N, d]
    logits = queries @ keys.t() / temperature
    local = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([local, local + total])
    positive_idx = torch.cat([local + total, local])
    rows = torch.arange(2 * n, device=z1.device)
    logits = logits.index_put((rows, self_idx), logits.new_tensor(float("-inf")))
    return F.cross_entropy(logits, positive_idx)


def byol_loss(pred: Tensor, target: Tensor) -> Tensor:
    """BYOL regression loss: mean over the batch of 2 - 2 cos(pred, target); target detached."""
    cos = F.cosine_similarity(_upcast(pred), _upcast(target.detach()), dim=-1)
    return (2 - 2 * cos).mean()


def caption_bow_targets(tokens_BL: Tensor, vocab_size: int, idf: bool = False) -> Tensor:
    """Each caption's words as a distribution over the vocabulary [B, vocab_size]: the multi-hot
    of its token ids, padding (0), SOT and EOT left out (open_clip's BPE: SOT = vocab_size - 2,
    EOT = vocab_size - 1), each id weighted by its inverse document frequency when ``idf``
    (:func:`batch_idf`, else 1), divided by the row's sum; a row of zeros for a caption without
    words (or, with ``idf``, whose every word is in every caption of the global batch)."""
    hot_BV = torch.zeros(tokens_BL.shape[0], vocab_size, device=tokens_BL.device)
    hot_BV.scatter_(1, tokens_BL, 1.0)
    hot_BV[:, [0, vocab_size - 2, vocab_size - 1]] = 0.0
    if idf:
        hot_BV = hot_BV * batch_idf(hot_BV)
    return hot_BV / hot_BV.sum(1, keepdim=True).clamp_min(1e-12)


def batch_idf(hot_BV: Tensor) -> Tensor:
    """Inverse document frequency [vocab] of each token id over the global batch (every rank's
    captions): log((N + 1) / (df + 1)), N captions, df of them holding the id.

    SuperClass (Huang et al. 2024, official code) weights its targets by the same IDF from
    frequencies averaged over every step so far; here they are counted on the step's global
    batch, so the loss keeps no state (nothing to checkpoint or to cast under bf16) and every
    rank uses the same weights. On a cluster batch (thousands of captions) the two agree for
    all but rare words; on a small batch a word in few captions weighs at most log((N + 1) / 2).
    """
    df_V = hot_BV.sum(0)
    n = torch.tensor(float(hot_BV.shape[0]), device=hot_BV.device)
    if _world()[1] > 1:
        stats = torch.cat([df_V, n[None]])
        dist.all_reduce(stats)
        df_V, n = stats[:-1], stats[-1]
    return torch.log((n + 1) / (df_V + 1))


def caption_bow_loss(logits_BV: Tensor, targets_BV: Tensor) -> Tensor:
    """Cross-entropy of vocabulary logits [B, vocab] against caption-word distributions
    [B, vocab] (SuperClass's softmax loss, Huang et al. 2024), the
    mean over the captions that have words (this rank's; ranks hold equal batches)."""
    has_words_B = targets_BV.sum(1) > 0
    nll_B = -(targets_BV * F.log_softmax(logits_BV.float(), dim=-1)).sum(-1)
    return (nll_B * has_words_B).sum() / has_words_B.sum().clamp_min(1)


def caption_word_losses(
    image_bow_BVx: Tensor, text_bow_Bx: Tensor, tokens_BL: Tensor, idf: bool = False
) -> tuple[Tensor, Tensor]:
    """(image term, text term) of the caption-word losses: each image view's vocabulary logits
    [B*V, vocab] (rows sample-major: sample 0's views first) and each caption's own logits
    [B, vocab] against the caption's words (:func:`caption_bow_targets`).

    The image term is SuperClass's classification of caption words from the image (Huang et
    al., NeurIPS 2024); the text term asks the caption embedding to keep its own words, so the
    text tower cannot drop a word the images do not yet tell apart (against the predictive
    feature suppression of Bleeker et al. 2023, whose latent-target decoding it simplifies).
    ``idf`` weights each word by its inverse document frequency (:func:`batch_idf`)."""
    targets_BX = caption_bow_targets(tokens_BL, text_bow_Bx.shape[-1], idf)
    views = image_bow_BVx.shape[0] // targets_BX.shape[0]
    image = caption_bow_loss(image_bow_BVx, targets_BX.repeat_interleave(views, 0))
    return image, caption_bow_loss(text_bow_Bx, targets_BX)


@dataclass
class LossOutput:
    """The weighted total and each unweighted term (zero tensors for disabled terms)."""

    total: Tensor
    clip: Tensor
    simclr: Tensor
    byol: Tensor


def aclip_loss(
    image_emb_views: list[Tensor],
    text_emb: Tensor,
    logit_scale_exp: Tensor,
    simclr_z: list[Tensor] | None,
    byol_pred: list[Tensor] | None,
    byol_target: Tensor | None,
    w_simclr: float,
    w_byol: float,
    simclr_temperature: float = 0.1,
    logit_bias: Tensor | None = None,
) -> LossOutput:
    """A-CLIP objective (docs/design.md, A-CLIP step 6).

    total = mean_v InfoNCE(image_emb_views[v], text) + w_simclr * NT-Xent(z_1, z_2)
            + w_byol * mean_v BYOL(byol_pred[v], byol_target).

    With a ``logit_bias`` (``loss.contrastive=siglip``) the first term is mean_v SigLIP.

    The SimCLR term needs at least two views (it is zero with one; with more than two it is the
    mean over all view pairs). ``simclr_z``/``byol_pred`` = None disable those terms.
    """
    clip = contrastive_views(image_emb_views, text_emb, logit_scale_exp, logit_bias)
    zero = clip.new_zeros(())
    simclr = zero
    if simclr_z is not None and len(simclr_z) >= 2:
        pairs = [
            nt_xent(simclr_z[i], simclr_z[j], simclr_temperature)
            for i in range(len(simclr_z))
            for j in range(i + 1, len(simclr_z))
        ]
        simclr = torch.stack(pairs).mean()
    byol = zero
    if byol_pred is not None:
        if byol_target is None:
            raise ValueError("byol_pred given without byol_target")
        byol = torch.stack([byol_loss(pred, byol_target) for pred in byol_pred]).mean()
    total = clip + w_simclr * simclr + w_byol * byol
    return LossOutput(total=total, clip=clip, simclr=simclr, byol=byol)
