"""CLIP / ACLIPModel / heads / build_model: shapes, temperature, projections, head structure."""

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from aclip.config import LossConfig, ModelConfig
from aclip.model import build_model, compile_student
from aclip.model.clip import CLIP, ACLIPModel
from aclip.model.heads import byol_predictor, byol_projector, mlp, simclr_head
from aclip.model.text import TextTransformer
from aclip.model.vision import VisionTower

MODEL_CFG = ModelConfig(
    vision_model="vit_tiny_patch16_224",
    image_size=32,
    vision_kwargs={"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3},
    embed_dim=24,
    context_length=16,
    vocab_size=100,
    text_width=32,
    text_layers=2,
    text_heads=4,
)
SMALL_LOSS = LossConfig(simclr_hidden=64, simclr_out=16, byol_hidden=64, byol_out=8)


@pytest.fixture(scope="module")
def clip() -> CLIP:
    torch.manual_seed(0)
    return build_model(MODEL_CFG, SMALL_LOSS).clip.eval()


def tokens(batch: int) -> torch.Tensor:
    out = torch.randint(1, 99, (batch, 16), generator=torch.Generator().manual_seed(0))
    out[:, 10] = 99  # EOT
    return out


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_logit_scale_init_shape_and_exp(clip: CLIP) -> None:
    assert clip.logit_scale.shape == (1,)
    assert isinstance(clip.logit_scale, nn.Parameter)
    torch.testing.assert_close(clip.logit_scale.detach(), torch.tensor([math.log(1 / 0.07)]))
    torch.testing.assert_close(clip.logit_scale_exp().detach(), torch.tensor([1 / 0.07]))
    model = CLIP(clip.visual, clip.text, 24)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    torch.testing.assert_close(model.logit_scale_exp().detach(), torch.tensor([math.exp(2.0)]))
    assert model.logit_scale_exp().shape == (1,)


def test_init_temperature_sets_the_initial_logit_scale() -> None:
    cfg = dataclasses.replace(MODEL_CFG, init_temperature=0.02)
    clip = build_model(cfg, LossConfig(w_simclr=0, w_byol=0)).clip
    torch.testing.assert_close(clip.logit_scale.detach(), torch.tensor([math.log(50.0)]))
    torch.testing.assert_close(clip.logit_scale_exp().detach(), torch.tensor([50.0]))
    with pytest.raises(ValueError, match="init_temperature"):
        CLIP(clip.visual, clip.text, 24, init_temperature=0.0)


def test_the_scale_has_a_gradient_at_any_value_and_is_clamped_after_the_step(clip: CLIP) -> None:
    """No clamp in the forward pass (it would zero the gradient above ln 100); the trainer clamps
    the parameter to [0, ln 100] in place after each optimizer step, as open_clip does."""
    from aclip.distributed import clamp_parameter_
    from aclip.model.clip import LOGIT_SCALE_MAX

    model = CLIP(clip.visual, clip.text, 24)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.logit_scale_exp().sum().backward()
    assert model.logit_scale.grad.item() == pytest.approx(math.exp(10.0))
    clamp_parameter_(model.logit_scale, 0.0, LOGIT_SCALE_MAX)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_projection_layers(clip: CLIP) -> None:
    assert clip.image_proj.in_features == 48 and clip.image_proj.out_features == 24
    assert clip.text_proj.in_features == 32 and clip.text_proj.out_features == 24
    assert clip.image_proj.bias is None and clip.text_proj.bias is None


def test_encode_shapes_and_normalize(clip: CLIP) -> None:
    with torch.no_grad():
        img = clip.encode_image(images(3))
        img_n = clip.encode_image(images(3), normalize=True)
        txt = clip.encode_text(tokens(3))
        txt_n = clip.encode_text(tokens(3), normalize=True)
    assert img.shape == (3, 24) and txt.shape == (3, 24)
    torch.testing.assert_close(img_n.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt_n.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(img_n, img / img.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(txt, clip.text_proj(clip.text(tokens(3))))


def test_project_image_matches_encode_image(clip: CLIP) -> None:
    x = images(3)
    with torch.no_grad():
        pooled, _ = clip.visual.forward_with_relevance(x)
        torch.testing.assert_close(
            clip.project_image(pooled), clip.encode_image(x), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            clip.project_image(pooled, normalize=True),
            clip.encode_image(x, normalize=True),
            atol=1e-6,
            rtol=0,
        )


def test_encode_image_with_keep_idx(clip: CLIP) -> None:
    keep = torch.tensor([[0, 3, 5, 9], [1, 2, 14, 15]])
    x = images(2)
    with torch.no_grad():
        out = clip.encode_image(x, keep)
        ref = clip.image_proj(clip.visual(x, keep))
    assert out.shape == (2, 24)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _linear_dims(seq: nn.Sequential) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in seq if isinstance(m, nn.Linear)]


def test_mlp_structure() -> None:
    head = mlp(10, [20, 30], 5)
    kinds = [type(m) for m in head]
    assert kinds == [
        nn.Linear,
        nn.BatchNorm1d,
        nn.ReLU,
        nn.Linear,
        nn.BatchNorm1d,
        nn.ReLU,
        nn.Linear,
    ]
    assert _linear_dims(head) == [(10, 20), (20, 30), (30, 5)]
    assert [m.num_features for m in head if isinstance(m, nn.BatchNorm1d)] == [20, 30]
    out = head(torch.randn(4, 10))
    assert out.shape == (4, 5)
    assert (out < 0).any()  # no ReLU / BN after the final Linear


def test_default_head_sizes() -> None:
    simclr = simclr_head(768)
    assert _linear_dims(simclr) == [(768, 4096), (4096, 4096), (4096, 256)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in simclr) == 2
    assert sum(isinstance(m, nn.ReLU) for m in simclr) == 2
    projector = byol_projector(768)
    assert _linear_dims(projector) == [(768, 4096), (4096, 256)]
    predictor = byol_predictor()
    assert _linear_dims(predictor) == [(256, 4096), (4096, 256)]
    for head in (projector, predictor):
        assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


@pytest.mark.parametrize(("w_simclr", "w_byol"), [(1.0, 2.0), (0.0, 2.0), (1.0, 0.0), (0.0, 0.0)])
def test_build_model_heads(w_simclr: float, w_byol: float) -> None:
    loss = LossConfig(
        w_simclr=w_simclr,
        w_byol=w_byol,
        simclr_hidden=64,
        simclr_out=16,
        byol_hidden=64,
        byol_out=8,
    )
    model = build_model(MODEL_CFG, loss)
    assert isinstance(model, ACLIPModel)
    assert (model.simclr_head is not None) == (w_simclr > 0)
    assert (model.byol_projector is not None) == (w_byol > 0)
    assert (model.byol_predictor is not None) == (w_byol > 0)
    if model.simclr_head is not None:
        assert _linear_dims(model.simclr_head) == [(48, 64), (64, 64), (64, 16)]
    if model.byol_projector is not None:
        assert _linear_dims(model.byol_projector) == [(48, 64), (64, 8)]
        assert _linear_dims(model.byol_predictor) == [(8, 64), (64, 8)]
    clip = model.clip
    assert clip.visual.grid_hw == (4, 4) and clip.visual.width == 48
    assert clip.text.width == 32 and clip.text.context_length == 16
    assert len(clip.text.blocks) == 2 and clip.text.blocks[0].attn.heads == 4
    assert clip.text.token_embedding.num_embeddings == 100


def test_build_model_freeze_patch_embed() -> None:
    cfg = ModelConfig(**{**MODEL_CFG.__dict__, "freeze_patch_embed": True})
    model = build_model(cfg, SMALL_LOSS)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(".patch_embed." in n for n in frozen)


def test_aclip_forward_outputs() -> None:
    torch.manual_seed(0)
    model = build_model(MODEL_CFG, SMALL_LOSS).train()
    x, t = images(4), tokens(2)  # 2 samples x 2 views
    keep = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]] * 4)
    out = model(x, t, keep)
    assert out["image_emb"].shape == (4, 24) and out["text_emb"].shape == (2, 24)
    torch.testing.assert_close(out["image_emb"].norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out["text_emb"].norm(dim=-1), torch.ones(2))
    assert out["simclr_z"].shape == (4, 16) and out["byol_pred"].shape == (4, 8)
    assert out["logit_scale_exp"].shape == (1,)
    model.eval()
    with torch.no_grad():
        again = model(x, t, keep)
        torch.testing.assert_close(
            again["image_emb"], model.clip.encode_image(x, keep, normalize=True), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            again["byol_pred"],
            model.byol_predictor(model.byol_projector(model.clip.visual(x, keep))),
            rtol=0,
            atol=1e-6,
        )
    loss = sum(v.float().sum() for v in out.values())
    loss.backward()
    assert model.clip.logit_scale.grad is not None
    assert model.simclr_head[0].weight.grad is not None


def test_aclip_model_refuses_half_byol(clip: CLIP) -> None:
    with pytest.raises(ValueError):
        ACLIPModel(clip, None, byol_projector(48, 64, 8), None)


def test_text_tower_type(clip: CLIP) -> None:
    assert isinstance(clip.text, TextTransformer)
    assert isinstance(clip.visual, VisionTower)


def test_speed_switches_are_wired_by_build_model() -> None:
    cfg = dataclasses.replace(MODEL_CFG, grad_checkpointing=True, compile=True)
    model = build_model(cfg, SMALL_LOSS)
    assert model.clip.visual.grad_checkpointing and model.clip.text.grad_checkpointing
    assert model._compiled_call_impl is not None  # compiled lazily, on the first call
    plain = build_model(MODEL_CFG, SMALL_LOSS)
    assert not plain.clip.visual.grad_checkpointing and plain._compiled_call_impl is None
    assert list(model.state_dict()) == list(plain.state_dict())  # no _orig_mod. prefix


def test_compiled_student_matches_eager() -> None:
    """compile_student (traced by dynamo; the aot_eager backend keeps the test fast) gives the
    eager outputs and gradients; the teacher's copy of the vision tower stays eager."""
    models = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(MODEL_CFG, grad_checkpointing=True), SMALL_LOSS)
        models.append(compile_student(model, backend="aot_eager") if compiled else model)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([[0, 2, 5, 7], [1, 3, 8, 9], [4, 6, 10, 15], [11, 12, 13, 14]])
    outs = [m(x, tokens(4), keep) for m in models]
    for key in outs[0]:
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=0, atol=1e-6)
    for out in outs:
        (out["image_emb"].sum() + out["simclr_z"].square().sum()).backward()
    for p_eager, p_comp in zip(models[0].parameters(), models[1].parameters(), strict=True):
        if p_eager.grad is not None:
            torch.testing.assert_close(p_comp.grad, p_eager.grad, rtol=0, atol=1e-6)
    teacher = copy.deepcopy(models[1].clip.visual)
    assert teacher._compiled_call_impl is None
