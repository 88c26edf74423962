"""Image-text retrieval recall@k, counted the way CLIP_benchmark counts it.

CLIP_benchmark (``clip_benchmark.metrics.zeroshot_retrieval``) scores every caption against
every image and calls

- ``image_retrieval_recall@k`` (text -> image): the share of captions whose image is among the
  k images ranked highest for that caption;
- ``text_retrieval_recall@k`` (image -> text): the share of images with at least one of their
  captions among the k captions ranked highest for that image.

Rankings use ``torch.topk`` on the cosine similarity, as there. The score matrix is computed in
row chunks, so 25k captions x 5k images never needs the full matrix (or CLIP_benchmark's one-hot
[chunk, k, N] tensor) in memory. Unlike CLIP_benchmark, which fails when k exceeds the number of
candidates, k is capped at that number (recall 1 for such k).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from tqdm import tqdm

from aclip.model.clip import CLIP

Tokenizer = Callable[[list[str]], torch.Tensor]
RetrievalBatch = tuple[torch.Tensor, Sequence[Sequence[str]]]


@torch.no_grad()
def encode_retrieval_set(
    model: CLIP,
    tokenizer: Tokenizer,
    batches: Iterable[RetrievalBatch],
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised embeddings of a retrieval set, on the CPU, in fp32.

    ``batches`` yields (images [B, 3, H, W], per-image caption lists). Returns
    (image_emb [N_img, D], text_emb [N_txt, D], text_to_image [N_txt]): caption j describes
    image ``text_to_image[j]``, images numbered in the order they arrive.
    """
    image_embs, text_embs, text_to_image = [], [], []
    n_images = 0
    for images, captions in tqdm(batches, desc="retrieval", disable=not progress):
        flat = [c for caps in captions for c in caps]
        owners = [n_images + i for i, caps in enumerate(captions) for _ in caps]
        image_embs.append(model.encode_image(images.to(device), normalize=True).float().cpu())
        if flat:
            tokens = tokenizer(flat).to(device)
            text_embs.append(model.encode_text(tokens, normalize=True).float().cpu())
        text_to_image.append(torch.tensor(owners, dtype=torch.long))
        n_images += len(images)
    if n_images == 0:
        raise ValueError("retrieval set yielded no images")
    dim = image_embs[0].shape[1]
    text_emb = torch.cat(text_embs) if text_embs else torch.empty(0, dim)
    return torch.cat(image_embs), text_emb, torch.cat(text_to_image)


def _topk_hits(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    is_positive: Callable[[torch.Tensor, slice], torch.Tensor],
    ks: Sequence[int],
    chunk_size: int,
) -> dict[int, torch.Tensor]:
    """Per query and k: whether a positive candidate is among the k highest-scoring ones.

    ``is_positive(topk_idx [n, kmax], rows)`` marks which of the retrieved candidates are
    positives for the queries in ``rows``.
    """
    kmax = min(max(ks), candidates.shape[0])
    hits: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, queries.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        scores = queries[rows] @ candidates.T
        positive = is_positive(scores.topk(kmax, dim=1).indices, rows)
        for k in ks:
            hits[k].append(positive[:, : min(k, kmax)].any(dim=1))
    return {k: torch.cat(h) if h else torch.zeros(0, dtype=torch.bool) for k, h in hits.items()}


@torch.no_grad()
def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """``image_retrieval_recall@k`` (text -> image) and ``text_retrieval_recall@k``
    (image -> text) for each k, as CLIP_benchmark's ``zeroshot_retrieval.evaluate`` counts them.

    Embeddings are expected normalised; ``text_to_image[j]`` is the image of caption j.
    Scores are computed ``chunk_size`` query rows at a time on ``device`` (default: where the
    embeddings are).
    """
    if image_emb.shape[0] == 0 or text_emb.shape[0] == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if min(ks) < 1:
        raise ValueError(f"recall k must be >= 1 (got {list(ks)})")
    device = device if device is not None else image_emb.device
    images, texts = image_emb.to(device), text_emb.to(device)
    owner = text_to_image.to(device)
    image_ids = torch.arange(images.shape[0], device=device)

    def text_to_image_pos(idx: torch.Tensor, rows: slice) -> torch.Tensor:
        return idx == owner[rows, None]

    def image_to_text_pos(idx: torch.Tensor, rows: slice) -> torch.Tensor:
        return owner[idx] == image_ids[rows, None]

    t2i = _topk_hits(texts, images, text_to_image_pos, ks, chunk_size)
    i2t = _topk_hits(images, texts, image_to_text_pos, ks, chunk_size)
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = t2i[k].float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = i2t[k].float().mean().item()
    return metrics


def evaluate_retrieval(
    model: CLIP,
    tokenizer: Tokenizer,
    batches: Iterable[RetrievalBatch],
    device: torch.device | str = "cpu",
    ks: Sequence[int] = (1, 5, 10),
    progress: bool = False,
) -> dict[str, float]:
    """Encode ``batches`` with ``model`` (in eval mode; its mode is restored after) and return
    the recall metrics plus the set's size."""
    was_training = model.training
    model.eval()
    try:
        image_emb, text_emb, text_to_image = encode_retrieval_set(
            model, tokenizer, batches, device, progress
        )
    finally:
        model.train(was_training)
    metrics = retrieval_metrics(image_emb, text_emb, text_to_image, ks, device=device)
    return metrics | {"n_images": image_emb.shape[0], "n_texts": text_emb.shape[0]}
