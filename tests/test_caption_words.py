"""Caption-word losses (loss.w_caption_bow, loss.w_text_bow): the targets are the caption's words
as a distribution, the loss is soft-label cross-entropy (torch's own), each term's gradient
reaches its own tower only, the head is counted in the FLOPs, and with both weights 0 nothing
is built or changed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import fake_batch, tiny_config

from aclip.config import ConfigError
from aclip.methods.flops import linear_flops, step_flops
from aclip.methods.losses import caption_bow_loss, caption_bow_targets, caption_word_losses
from aclip.model import build_model
from aclip.tokenizer import Tokenizer
from aclip.train.trainer import Trainer

VOCAB = 49408


def test_special_ids_are_the_last_two_of_the_vocabulary():
    tok = Tokenizer(16)
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) == (VOCAB, VOCAB - 2, VOCAB - 1)


def test_targets_are_the_distinct_words_of_each_caption():
    tok = Tokenizer(16)
    tokens_BL = tok(["a red circle and a blue circle", ""])
    targets_BV = caption_bow_targets(tokens_BL, VOCAB)
    words = set(tok.encode("a red circle and a blue circle"))  # a, red, circle, and, blue
    assert len(words) == 5
    expected = torch.zeros(VOCAB)
    expected[list(words)] = 1 / 5
    assert torch.equal(targets_BV[0], expected)
    assert targets_BV[1].sum() == 0  # SOT, EOT and padding are not words


def test_idf_weights_each_word_by_its_document_frequency_in_the_batch():
    tok = Tokenizer(16)
    captions = ["a red star", "a blue star", "a red ring", "a star"]
    targets_BV = caption_bow_targets(tok(captions), VOCAB, idf=True)
    a, red, blue, star, ring = (tok.encode(w)[0] for w in ("a", "red", "blue", "star", "ring"))
    df = {a: 4, red: 2, blue: 1, star: 3, ring: 1}
    weight = {w: math.log(5 / (d + 1)) for w, d in df.items()}  # log((N + 1) / (df + 1)), N = 4
    assert weight[a] == 0.0  # a word in every caption carries nothing
    for row, words in enumerate([(a, red, star), (a, blue, star), (a, red, ring), (a, star)]):
        expected = torch.zeros(VOCAB)
        for w in words:
            expected[w] = weight[w] / sum(weight[v] for v in words)
        torch.testing.assert_close(targets_BV[row], expected)
    assert targets_BV[3].sum() == 1  # "a star": all its weight on "star"
    # without IDF the same captions are uniform over their words
    assert torch.equal(caption_bow_targets(tok(captions), VOCAB)[0][[a, red, star]],
                       torch.full((3,), 1 / 3))  # fmt: skip


def _idf_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        tokens_BL = Tokenizer(16)(IDF_CAPTIONS[2 * rank : 2 * rank + 2])
        torch.save(caption_bow_targets(tokens_BL, VOCAB, idf=True), f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


IDF_CAPTIONS = ["a red star", "a blue star", "a red ring", "a green heart"]


@pytest.mark.slow
def test_idf_counts_every_ranks_captions(tmp_path):
    mp.spawn(_idf_rank, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    two_ranks_BV = torch.cat([torch.load(tmp_path / f"rank{r}.pt") for r in range(2)])
    one_rank_BV = caption_bow_targets(Tokenizer(16)(IDF_CAPTIONS), VOCAB, idf=True)
    torch.testing.assert_close(two_ranks_BV, one_rank_BV, atol=1e-7, rtol=0)
    # each rank alone would weigh "star" (in both of rank 0's captions) at zero
    alone_BV = caption_bow_targets(Tokenizer(16)(IDF_CAPTIONS[:2]), VOCAB, idf=True)
    star = Tokenizer(16).encode("star")[0]
    assert alone_BV[0, star] == 0 and two_ranks_BV[0, star] > 0


def test_loss_is_soft_label_cross_entropy_over_captions_with_words():
    gen = torch.Generator().manual_seed(0)
    logits_BV = torch.randn(4, 50, generator=gen)
    targets_BV = torch.rand(4, 50, generator=gen)
    targets_BV = targets_BV / targets_BV.sum(1, keepdim=True)
    ref = F.cross_entropy(logits_BV, targets_BV)
    torch.testing.assert_close(caption_bow_loss(logits_BV, targets_BV), ref)
    targets_BV[2] = 0  # a caption without words is left out of the mean
    keep = [0, 1, 3]
    ref = F.cross_entropy(logits_BV[keep], targets_BV[keep])
    torch.testing.assert_close(caption_bow_loss(logits_BV, targets_BV), ref)


def test_each_view_is_scored_against_its_own_caption():
    tok = Tokenizer(16)
    tokens_BL = tok(["a red star", "a blue ring"])
    gen = torch.Generator().manual_seed(1)
    image_BVx = torch.randn(4, VOCAB, generator=gen)  # 2 samples x 2 views, sample-major
    text_Bx = torch.randn(2, VOCAB, generator=gen)
    image, text = caption_word_losses(image_BVx, text_Bx, tokens_BL)
    targets = caption_bow_targets(tokens_BL, VOCAB)
    per_view = [F.cross_entropy(image_BVx[i : i + 1], targets[i // 2 : i // 2 + 1])
                for i in range(4)]  # fmt: skip
    torch.testing.assert_close(image, torch.stack(per_view).mean())
    torch.testing.assert_close(text, F.cross_entropy(text_Bx, targets))


@pytest.mark.parametrize(("term", "reached", "untouched"), [
    ("caption_bow", "clip.visual.", "clip.text."),
    ("text_bow", "clip.text.", "clip.visual."),
])  # fmt: skip
def test_each_term_trains_its_own_tower(tmp_path, dist_info, term, reached, untouched):
    cfg = tiny_config(str(tmp_path), **{"loss.w_caption_bow": 1.0, "loss.w_text_bow": 1.0})
    trainer = Trainer(cfg, dist_info)
    method, model = trainer.method, trainer.model
    loss = method.loss(model, fake_batch(cfg, 8, seed=3), 0)
    model.zero_grad()
    loss.terms[term].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    mine = [g for n, g in grads.items() if n.startswith(reached)]
    other = [g for n, g in grads.items() if n.startswith(untouched)]
    assert any(g is not None and g.abs().sum() > 0 for g in mine)
    assert all(g is None or g.abs().sum() == 0 for g in other)
    assert grads["bow_head.weight"].abs().sum() > 0


def test_the_text_term_is_learned(tmp_path, dist_info):
    """A few steps on one batch: the caption embedding comes to predict its own words."""
    cfg = tiny_config(str(tmp_path), **{"loss.w_text_bow": 1.0, "loss.w_simclr": 0,
                                        "loss.w_byol": 0})  # fmt: skip
    trainer = Trainer(cfg, dist_info)
    batch = fake_batch(cfg, 8, seed=5)
    first = trainer.train_step(batch)["loss_text_bow"].item()
    for _ in range(30):
        last = trainer.train_step(batch)["loss_text_bow"].item()
    assert first == pytest.approx(torch.log(torch.tensor(VOCAB)).item(), rel=0.05)
    assert last < 0.5 * first


@pytest.mark.parametrize("idf", [False, True])
def test_the_method_scores_words_with_or_without_idf(tmp_path, dist_info, idf):
    cfg = tiny_config(str(tmp_path), **{"loss.w_caption_bow": 1.0, "loss.w_text_bow": 1.0,
                                        "loss.caption_bow_idf": idf})  # fmt: skip
    trainer = Trainer(cfg, dist_info)
    batch = fake_batch(cfg, 8, seed=3)
    torch.manual_seed(0)
    loss = trainer.method.loss(trainer.model, batch, 0)
    torch.manual_seed(0)
    outputs = trainer.method.forward(trainer.model, trainer.method.prepare(batch, 0))
    for flag in (idf, not idf):
        image, text = caption_word_losses(
            outputs["image_bow"], outputs["text_bow"], batch["tokens"], flag
        )
        same = torch.allclose(loss.terms["caption_bow"], image) and torch.allclose(
            loss.terms["text_bow"], text
        )
        assert same == (flag == idf)


def test_no_weights_no_head_and_the_same_model(tmp_path):
    base = tiny_config(str(tmp_path))
    torch.manual_seed(0)
    model = build_model(base.model, base.loss)
    assert model.bow_head is None
    words = tiny_config(str(tmp_path), **{"loss.w_text_bow": 1.0})
    torch.manual_seed(0)
    with_head = build_model(words.model, words.loss)
    state, head_state = model.state_dict(), with_head.state_dict()
    assert set(head_state) - set(state) == {"bow_head.weight", "bow_head.bias"}
    assert all(torch.equal(state[k], head_state[k]) for k in state)  # built after the rest


def test_head_is_counted_in_the_flops(tmp_path):
    base = tiny_config(str(tmp_path))
    words = tiny_config(str(tmp_path), **{"loss.w_caption_bow": 1.0})
    model, with_head = build_model(base.model, base.loss), build_model(words.model, words.loss)
    views = base.mask.num_views
    extra = step_flops(with_head, words, 8).heads - step_flops(model, base, 8).heads
    assert extra == 8 * (views + 1) * linear_flops(with_head.bow_head)
    assert linear_flops(with_head.bow_head) == 2 * base.model.embed_dim * VOCAB


@pytest.mark.parametrize("override", ["loss.w_text_bow=-1", "method=alpha_clip"])
def test_bad_weights_are_refused(tmp_path, override):
    from aclip.config import load_config

    extra = ["loss.w_caption_bow=1"] if override.startswith("method") else []
    with pytest.raises(ConfigError, match="w_caption_bow/w_text_bow"):
        load_config(None, [override, *extra, "model.alpha_channel=true"])


def test_resume_refuses_a_checkpoint_without_the_head(tmp_path):
    from aclip.config import to_yaml
    from aclip.methods import shape_fields
    from aclip.train.checkpoint import CONFIG_FILE, check_compatible

    (tmp_path / CONFIG_FILE).write_text(to_yaml(tiny_config(str(tmp_path))))
    words = tiny_config(str(tmp_path), **{"loss.w_text_bow": 1.0})
    with pytest.raises(ConfigError, match="loss.caption_word_head: checkpoint False"):
        check_compatible(words, tmp_path, shape_fields)
    check_compatible(tiny_config(str(tmp_path), **{"loss.w_simclr": 0.5}), tmp_path, shape_fields)
