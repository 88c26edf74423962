"""SigLIP (loss.contrastive=siglip): the loss against open_clip's SigLipLoss and a written-out
formula (1 rank and 2 gloo ranks), the model's logit bias and start, the config and resume
checks, the export refusal, and two training steps of method clip and aclip."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import fake_batch, tiny_config
from open_clip.loss import SigLipLoss

from aclip.config import ConfigError, to_yaml
from aclip.methods import shape_fields
from aclip.methods.losses import aclip_loss, multi_view_siglip, siglip
from aclip.model import build_clip, build_model
from aclip.train.trainer import Trainer

N_GLOBAL, DIM, WORLD = 8, 16, 2
SIGLIP = {"loss.contrastive": "siglip"}


def _features(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _leaves(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Raw features and the (1,)-shaped scale and bias, fresh leaves with gradients. Scale 10
    and bias -3 (not SigLIP's -10) so that positives and negatives both weigh in the gradient."""
    return {
        "img": _features(N_GLOBAL, DIM, 0, dtype).requires_grad_(),
        "txt": _features(N_GLOBAL, DIM, 1, dtype).requires_grad_(),
        "scale": torch.tensor([10.0], dtype=dtype, requires_grad=True),
        "bias": torch.tensor([-3.0], dtype=dtype, requires_grad=True),
    }


def _ours(x: dict[str, torch.Tensor]) -> torch.Tensor:
    return siglip(F.normalize(x["img"], dim=1), F.normalize(x["txt"], dim=1), x["scale"], x["bias"])


def _open_clip(x: dict[str, torch.Tensor], rank: int = 0, world: int = 1) -> torch.Tensor:
    """open_clip's SigLipLoss with its default (bidir) exchange; 0-d scale and bias as its CLIP
    has them."""
    loss = SigLipLoss(rank=rank, world_size=world)
    img, txt = F.normalize(x["img"], dim=1), F.normalize(x["txt"], dim=1)
    return loss(img, txt, x["scale"][0], x["bias"][0])


def _written_out(x: dict[str, torch.Tensor]) -> torch.Tensor:
    """-(1/B) sum_ij log sigmoid(z_ij (t x_i.y_j + b)), z = +1 on the diagonal, as loops."""
    img, txt = F.normalize(x["img"], dim=1), F.normalize(x["txt"], dim=1)
    total = 0.0
    for i in range(img.shape[0]):
        for j in range(txt.shape[0]):
            z = 1.0 if i == j else -1.0
            total = total + math.log(torch.sigmoid(z * (10.0 * img[i] @ txt[j] - 3.0)).item())
    return torch.tensor(-total / img.shape[0], dtype=torch.float64)


def _grads(loss: torch.Tensor, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(x, torch.autograd.grad(loss, list(x.values())), strict=True))


# ----------------------------------------------------------------------------- one rank


def test_siglip_matches_open_clip_value_and_gradients():
    ours, ref = _leaves(), _leaves()
    loss, ref_loss = _ours(ours), _open_clip(ref)
    assert loss.item() > 1.0  # not a degenerate value
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    got, want = _grads(loss, ours), _grads(ref_loss, ref)
    for name in ("img", "txt", "scale", "bias"):
        assert want[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], want[name].reshape(got[name].shape), atol=1e-6,
                                   rtol=0)  # fmt: skip


def test_siglip_is_the_written_out_formula_and_not_infonce_labels():
    x = {k: v.detach().double() for k, v in _leaves().items()}
    torch.testing.assert_close(_ours(x), _written_out(x), atol=1e-9, rtol=0)
    # the sign matrix matters: all pairs as negatives gives another value
    img, txt = F.normalize(x["img"], dim=1), F.normalize(x["txt"], dim=1)
    all_negative = -F.logsigmoid(-(10.0 * img @ txt.t() - 3.0)).sum() / N_GLOBAL
    assert abs(all_negative.item() - _ours(x).item()) > 0.1


def test_views_are_averaged_and_aclip_loss_takes_the_bias():
    x = {k: v.detach() for k, v in _leaves().items()}
    img = F.normalize(x["img"], dim=1)
    img2 = F.normalize(_features(N_GLOBAL, DIM, 7), dim=1)
    txt = F.normalize(x["txt"], dim=1)
    one, two = siglip(img, txt, x["scale"], x["bias"]), siglip(img2, txt, x["scale"], x["bias"])
    views = multi_view_siglip([img, img2], txt, x["scale"], x["bias"])
    torch.testing.assert_close(views, (one + two) / 2)
    out = aclip_loss([img, img2], txt, x["scale"], None, None, None, 0.0, 0.0, 0.1, x["bias"])
    torch.testing.assert_close(out.clip, views)
    infonce = aclip_loss([img, img2], txt, x["scale"], None, None, None, 0.0, 0.0)
    assert abs(infonce.clip.item() - views.item()) > 0.1


# ----------------------------------------------------------------------------- two gloo ranks


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        n, rows = (
            N_GLOBAL // WORLD,
            slice(rank * (N_GLOBAL // WORLD), (rank + 1) * N_GLOBAL // WORLD),
        )
        result = {}
        for who, fn in (("ours", _ours), ("ref", lambda x: _open_clip(x, rank, WORLD))):
            full = _leaves(torch.float64)
            x = {k: (v[rows] if k in ("img", "txt") else v).detach().clone().requires_grad_()
                 for k, v in full.items()}  # fmt: skip
            assert x["img"].shape[0] == n
            loss = fn(x)
            loss.backward()
            result[who] = {"loss": loss.detach()} | {k: v.grad for k, v in x.items()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_match_open_clip_and_the_full_batch(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # each rank's loss and gradients are open_clip's (its own world_size=2 neighbour exchange)
    for r in range(WORLD):
        ours, ref = res[r]["ours"], res[r]["ref"]
        for name in ("loss", "img", "txt", "scale", "bias"):
            torch.testing.assert_close(ours[name], ref[name].reshape(ours[name].shape),
                                       atol=1e-6, rtol=0)  # fmt: skip
    assert not math.isclose(res[0]["ours"]["loss"].item(), res[1]["ours"]["loss"].item())
    # and the 1-process loss on the whole batch: mean of the ranks' losses, rank r's feature
    # gradients WORLD x the full gradient of its rows, the summed scale/bias gradients WORLD x
    full = _leaves(torch.float64)
    loss = _ours(full)
    grads = _grads(loss, full)
    mean = sum(res[r]["ours"]["loss"] for r in range(WORLD)) / WORLD
    torch.testing.assert_close(mean, loss.detach(), atol=1e-6, rtol=0)
    n = N_GLOBAL // WORLD
    for r in range(WORLD):
        for name in ("img", "txt"):
            want = WORLD * grads[name][r * n : (r + 1) * n]
            torch.testing.assert_close(res[r]["ours"][name], want, atol=1e-6, rtol=0)
    for name in ("scale", "bias"):
        summed = sum(res[r]["ours"][name] for r in range(WORLD))
        torch.testing.assert_close(summed, WORLD * grads[name], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- model and config


def test_siglip_model_has_the_bias_and_starts_at_t10_b_minus10(tmp_path):
    cfg = tiny_config(str(tmp_path), **SIGLIP)
    clip = build_clip(cfg.model, cfg.loss)
    assert clip.logit_bias.shape == (1,) and clip.logit_bias.item() == -10.0
    assert clip.logit_scale_exp().item() == pytest.approx(10.0, abs=1e-5)
    student = build_model(cfg.model, cfg.loss)
    assert "clip.logit_bias" in dict(student.named_parameters())


def test_default_builds_the_same_model_as_before(tmp_path):
    cfg = tiny_config(str(tmp_path))
    assert cfg.loss.contrastive == "infonce"
    torch.manual_seed(0)
    plain = build_model(cfg.model, cfg.loss)
    torch.manual_seed(0)
    bare = build_clip(cfg.model)  # no loss config: InfoNCE's model
    assert plain.clip.logit_bias is None and bare.logit_bias is None
    assert "clip.logit_bias" not in plain.state_dict()
    assert plain.clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    siglip_cfg = tiny_config(str(tmp_path), **SIGLIP)
    torch.manual_seed(0)
    with_bias = build_model(siglip_cfg.model, siglip_cfg.loss)
    assert set(with_bias.state_dict()) - set(plain.state_dict()) == {"clip.logit_bias"}
    # the bias is created last: every other weight is the same for the same seed
    for name, value in plain.state_dict().items():
        if name != "clip.logit_scale":
            assert torch.equal(value, with_bias.state_dict()[name]), name


@pytest.mark.parametrize(("overrides", "key"), [
    ({"loss.contrastive": "sigmoid"}, "loss.contrastive"),
    (SIGLIP | {"model.init_temperature": 0.05}, "model.init_temperature"),
    (SIGLIP | {"loss.siglip_init_scale": 0.5}, "loss.siglip_init_scale"),
])  # fmt: skip
def test_config_refuses_bad_values(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(str(tmp_path), **overrides)


def test_alpha_clip_refuses_siglip(tmp_path):
    with pytest.raises(ConfigError, match=r"loss\.contrastive.*alpha_clip"):
        tiny_config(str(tmp_path), method="alpha_clip", **{"model.alpha_channel": True}, **SIGLIP)


def test_resume_of_an_infonce_checkpoint_into_a_siglip_run_is_refused(tmp_path):
    from aclip.train.checkpoint import CONFIG_FILE, check_compatible

    (tmp_path / CONFIG_FILE).write_text(to_yaml(tiny_config(str(tmp_path))))
    with pytest.raises(ConfigError, match="loss.logit_bias: checkpoint False, config True"):
        check_compatible(tiny_config(str(tmp_path), **SIGLIP), tmp_path, shape_fields)
    check_compatible(tiny_config(str(tmp_path)), tmp_path, shape_fields)


def test_export_of_a_siglip_model_is_refused(tmp_path):
    from aclip.interop.weights import NotExpressible
    from aclip.interop.write import open_clip_model_cfg, to_openai_state_dict

    cfg = tiny_config(str(tmp_path), **SIGLIP)
    clip = build_clip(cfg.model, cfg.loss)
    for export in (open_clip_model_cfg, to_openai_state_dict):
        with pytest.raises(NotExpressible, match="logit bias"):
            export(clip)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["clip", "aclip"])
def test_two_training_steps_train_the_bias(tmp_path, dist_info, method):
    one_view = {"mask.num_views": 1, "loss.w_simclr": 0} if method == "clip" else {}
    cfg = tiny_config(str(tmp_path), method=method, **SIGLIP, **one_view)
    trainer = Trainer(cfg, dist_info)
    clip = trainer.model.clip
    batch = fake_batch(cfg, 8, seed=3)
    expected = siglip_of(trainer, batch)
    stats = trainer.train_step(batch)
    assert stats["loss_clip"].item() == pytest.approx(expected, rel=1e-5)
    trainer.train_step(batch)
    assert clip.logit_bias.item() != -10.0
    assert math.isfinite(clip.logit_bias.item()) and math.isfinite(clip.logit_scale.item())


def siglip_of(trainer: Trainer, batch: dict[str, torch.Tensor]) -> float:
    """The step's contrastive term recomputed from the student's outputs with the loss function
    (the SigLIP value, about B * log 2 + 10 at the start: every pair a negative near 0)."""
    method = trainer.method
    torch.manual_seed(0)
    with torch.no_grad():
        prepared = method.prepare(batch, 0)
        out = method.forward(trainer.model, prepared)
    n, v = prepared["views"].shape[:2]
    views = list(out["image_emb"].view(n, v, -1).unbind(1))
    return multi_view_siglip(views, out["text_emb"], out["logit_scale_exp"],
                             out["logit_bias"]).item()  # fmt: skip


def test_a_siglip_run_reads_back_with_and_without_its_bias(tmp_path):
    from aclip.interop import load_clip
    from aclip.interop.fit import fit_state_dict
    from aclip.interop.run import load_eval_model

    cfg = tiny_config(str(tmp_path), **SIGLIP)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss).eval()
    with torch.no_grad():
        model.clip.logit_bias.fill_(-7.5)
    tag = tmp_path / "checkpoints" / "global_step0"
    tag.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("global_step0")
    states = {"module": model.state_dict(), "config": to_yaml(cfg), "ema": None}
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    clip, _ = load_eval_model(tmp_path)  # the run's own model: the bias comes back
    assert clip.logit_bias.item() == -7.5
    plain, _, _ = load_clip(str(tmp_path))  # the generic reader: a CLIP for embeddings
    assert plain.logit_bias is None
    image = torch.randn(2, 3, cfg.model.image_size, cfg.model.image_size)
    torch.testing.assert_close(plain.encode_image(image), clip.encode_image(image))
    # an InfoNCE model's weights into a siglip model keep the model's own bias
    infonce = build_clip(cfg.model)
    sd, notes = fit_state_dict(infonce.state_dict(), build_clip(cfg.model, cfg.loss))
    assert sd["logit_bias"].item() == -10.0 and any("logit bias" in n for n in notes)


def test_micro_batches_give_the_whole_batchs_siglip_loss_and_gradients(tmp_path, dist_info):
    """Gradient accumulation keeps the bias a whole output: 2 micro-batches give the loss and
    gradients (the bias's included) of the whole batch."""
    from aclip.train.accumulation import micro_losses

    cfg = tiny_config(str(tmp_path), method="clip", **SIGLIP, **{"mask.num_views": 1,
                      "train.global_batch_size": 16})  # fmt: skip
    trainer = Trainer(cfg, dist_info)
    model, batch = trainer.model, fake_batch(cfg, 16, seed=3)
    results = []
    for parts in (1, 2):
        model.zero_grad(set_to_none=True)
        losses = [loss.total for loss in micro_losses(trainer.method, model, batch, 0, parts)]
        for loss in losses:
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((losses[0].item(), grads))
    (whole_loss, whole), (loss, grads) = results
    assert loss == pytest.approx(whole_loss, abs=1e-5)
    assert set(grads) == set(whole) and whole["clip.logit_bias"].abs().sum() > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, whole[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("contrastive", ["infonce", "siglip"])
def test_flop_model_counts_the_contrastive_logits(tmp_path, contrastive):
    """The FLOP model's loss term equals FlopCounterMode's count of the loss function (one view,
    no NT-Xent): SigLIP scores image->text only, half of InfoNCE's two directions."""
    from torch.utils.flop_counter import FlopCounterMode

    from aclip.methods.flops import config_step_flops
    from aclip.methods.losses import contrastive_views

    cfg = tiny_config(str(tmp_path), method="clip", **{"loss.contrastive": contrastive,
                      "mask.num_views": 1, "loss.w_simclr": 0})  # fmt: skip
    batch, dim = 8, cfg.model.embed_dim
    img, txt = _features(batch, dim, 0), _features(batch, dim, 1)
    bias = torch.tensor([-10.0]) if contrastive == "siglip" else None
    with FlopCounterMode(display=False) as counter:
        contrastive_views([img], txt, torch.tensor([10.0]), bias)
    assert config_step_flops(cfg, batch).loss == counter.get_total_flops()
