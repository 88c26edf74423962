"""TextTransformer: causality, EOT pooling, CLIP parameter count, equivalence with open_clip."""

import pytest
import torch
from open_clip.model import _build_text_tower

from aclip.model.text import TextTransformer

TINY = {"context_length": 16, "vocab_size": 100, "width": 64, "layers": 2, "heads": 4}
EOT = TINY["vocab_size"] - 1  # CLIP's EOT has the largest id


def tiny(seed: int = 0) -> TextTransformer:
    torch.manual_seed(seed)
    return TextTransformer(**TINY).eval()


def tokens_with_eot(lengths: list[int], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.zeros(len(lengths), TINY["context_length"], dtype=torch.long)
    for i, n in enumerate(lengths):
        rows[i, :n] = torch.randint(1, EOT, (n,), generator=gen)
        rows[i, n] = EOT
    return rows


def test_output_shape_and_width() -> None:
    model = tiny()
    assert model.width == 64
    out = model(tokens_with_eot([3, 7, 14]))
    assert out.shape == (3, 64)
    assert model(tokens_with_eot([3, 5])[:, :8]).shape == (2, 64)  # L < context_length
    with pytest.raises(ValueError):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_causality() -> None:
    model = tiny()
    tokens = tokens_with_eot([14, 14])
    t = 6
    changed = tokens.clone()
    changed[:, t + 1 :] = torch.randint(1, EOT, changed[:, t + 1 :].shape)
    with torch.no_grad():
        a = model.forward_tokens(tokens)
        b = model.forward_tokens(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-3)
    # and a change at t does reach t
    changed[:, t] = (tokens[:, t] % (EOT - 1)) + 1
    with torch.no_grad():
        c = model.forward_tokens(changed)
    assert not torch.allclose(a[:, t], c[:, t], atol=1e-3)


def test_eot_pooling() -> None:
    model = tiny()
    tokens = tokens_with_eot([2, 9, 14])
    with torch.no_grad():
        pooled = model(tokens)
        hidden = model.forward_tokens(tokens)
        padded = tokens.clone()
        padded[0, 3:] = 5  # tokens after the EOT (any id below EOT) do not matter
        padded[1, 10:] = 42
        pooled_padded = model(padded)
    for row, eot_pos in enumerate([2, 9, 14]):
        torch.testing.assert_close(pooled[row], hidden[row, eot_pos], rtol=0, atol=0)
    torch.testing.assert_close(pooled_padded, pooled, rtol=0, atol=1e-6)


def _load_into_open_clip(ours: TextTransformer, ref: torch.nn.Module) -> None:
    mapping = {"positional_embedding": "positional_embedding", "ln_final": "ln_final"}
    mapping["token_embedding"] = "token_embedding"
    for i in range(len(ours.blocks)):
        src, dst = f"blocks.{i}.", f"transformer.resblocks.{i}."
        mapping[src + "ln1"] = dst + "ln_1"
        mapping[src + "ln2"] = dst + "ln_2"
        mapping[src + "attn.qkv.weight"] = dst + "attn.in_proj_weight"
        mapping[src + "attn.qkv.bias"] = dst + "attn.in_proj_bias"
        mapping[src + "attn.proj"] = dst + "attn.out_proj"
        mapping[src + "fc1"] = dst + "mlp.c_fc"
        mapping[src + "fc2"] = dst + "mlp.c_proj"
    state = {}
    for name, value in ours.state_dict().items():
        prefix = max((p for p in mapping if name.startswith(p)), key=len)
        state[mapping[prefix] + name[len(prefix) :]] = value
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected
    assert all("attn_mask" in m for m in missing), missing


def test_equals_open_clip_text_tower() -> None:
    ours = tiny(seed=3)
    ref = _build_text_tower(
        32,
        {
            "context_length": 16,
            "vocab_size": 100,
            "width": 64,
            "layers": 2,
            "heads": 4,
            "proj_type": "none",
        },
    ).eval()
    _load_into_open_clip(ours, ref)
    tokens = tokens_with_eot([1, 5, 10, 14], seed=4)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens), rtol=0, atol=1e-5)


def test_param_count_matches_clip_text_tower() -> None:
    ours = TextTransformer(context_length=77, vocab_size=49408, width=512, layers=12, heads=8)
    ref = _build_text_tower(512, {"proj_type": "none"})
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_ours == n_ref == 63_165_952
    n_blocks = sum(p.numel() for p in ours.blocks.parameters())
    assert abs(n_blocks - 37.8e6) < 0.1e6  # 12 x 3.15M; the rest is the 25.3M token embedding


def test_clip_init_statistics() -> None:
    torch.manual_seed(0)
    model = TextTransformer(context_length=77, vocab_size=2000, width=256, layers=4, heads=4)
    proj_std = 256**-0.5 * (2 * 4) ** -0.5
    assert abs(model.token_embedding.weight.std().item() - 0.02) < 0.001
    assert abs(model.positional_embedding.std().item() - 0.01) < 0.001
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 256**-0.5) < 0.003
    assert abs(model.blocks[1].attn.proj.weight.std().item() - proj_std) < 0.003
    assert abs(model.blocks[2].fc1.weight.std().item() - 512**-0.5) < 0.003
    assert abs(model.blocks[3].fc2.weight.std().item() - proj_std) < 0.003


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for recompute in (False, True):
        model = tiny(seed=2).train()
        model.set_grad_checkpointing(recompute)
        model(tokens_with_eot([3, 7, 14])).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_token_drop_hides_dropped_tokens_from_every_other_position() -> None:
    torch.manual_seed(0)
    model = TextTransformer(**TINY, token_drop=0.5).train()
    tokens = tokens_with_eot([12, 9, 14], seed=3)
    torch.manual_seed(7)
    mask = model.drop_mask(tokens)[:, 0]
    torch.manual_seed(7)
    out = model(tokens)
    eot = tokens.argmax(-1)
    for i in range(len(tokens)):
        dropped = [t for t in range(1, int(eot[i])) if not mask[i, int(eot[i]), t]]
        kept = [t for t in range(1, int(eot[i])) if mask[i, int(eot[i]), t]]
        assert dropped and kept  # this seed drops some tokens of every row and keeps some
        # a dropped token can be anything: the EOT feature does not change
        changed = tokens.clone()
        changed[i, dropped] = (changed[i, dropped] % (EOT - 1)) + 1
        torch.manual_seed(7)
        torch.testing.assert_close(model(changed)[i], out[i], rtol=0, atol=1e-5)
        # a kept token is seen
        changed = tokens.clone()
        changed[i, kept[0]] = (changed[i, kept[0]] % (EOT - 1)) + 1
        torch.manual_seed(7)
        assert not torch.allclose(model(changed)[i], out[i], atol=1e-4)


def test_token_drop_mask_rules_and_rate() -> None:
    model = TextTransformer(**TINY, token_drop=0.3).train()
    tokens = tokens_with_eot([14] * 400, seed=1)
    torch.manual_seed(0)
    mask = model.drop_mask(tokens)[:, 0]  # [B, L, L]
    visible = mask[:, 14]  # what the EOT query sees
    assert visible[:, 0].all() and visible[:, 14].all()  # SOT and EOT always kept
    assert not visible[:, 15:].any()  # causal
    assert visible[:, 1:14].float().mean().item() == pytest.approx(0.7, abs=0.02)
    assert mask.diagonal(dim1=1, dim2=2).all()  # every position sees itself
    # the same tokens are hidden from every later query
    assert torch.equal(mask[:, 13, :13], visible[:, :13])


def test_token_drop_only_in_training_and_zero_is_the_plain_path() -> None:
    torch.manual_seed(0)
    plain = TextTransformer(**TINY).eval()
    dropping = TextTransformer(**TINY, token_drop=0.5)
    dropping.load_state_dict(plain.state_dict())
    tokens = tokens_with_eot([5, 14])
    with torch.no_grad():
        torch.testing.assert_close(dropping.eval()(tokens), plain(tokens), rtol=0, atol=0)
        state = torch.get_rng_state()
        plain.train()(tokens)
        assert torch.equal(torch.get_rng_state(), state)  # p = 0 draws nothing
    with pytest.raises(ValueError, match="token_drop"):
        TextTransformer(**TINY, token_drop=1.0)
