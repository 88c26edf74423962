"""Interop: open_clip / OpenAI / timm weights into aclip with numeric parity, and back out.

Every peer model is built by the peer library itself (open_clip, timm), randomly initialised and
then jittered (so zero biases and unit LayerNorms cannot hide a layout error); nothing is
downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import CLIP_QUICKGELU_TINY_ARGS, quiet_logs
from open_clip.model import build_model_from_openai_state_dict, convert_weights_to_lp
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from aclip import interop
from aclip.config import ModelConfig, load_config
from aclip.interop import NotExpressible, WeightsError
from aclip.model import build_model
from aclip.model.clip import CLIP
from aclip.tokenizer import Tokenizer

ATOL = 1e-5
CAPTIONS = ["a photo of a cat", "a red square", "two dogs playing in the snow", "x"]


def small_cfg(
    quick_gelu: bool, head_width: int = 32, text_width: int = 64, mlp_ratio: float = 3.0
) -> dict:
    """A small open_clip ViT config (by default 4 heads of 32, a 3x MLP in the image tower)."""
    return {
        "embed_dim": 48,
        "quick_gelu": quick_gelu,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 128,
            "head_width": head_width,
            "mlp_ratio": mlp_ratio,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": text_width,
            "heads": text_width // 32 if head_width == 32 else text_width // 64,
            "layers": 2,
        },
    }


def jitter(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (biases start at zero, LayerNorms at one)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.eval()


def open_clip_model(name_or_cfg: str | dict, tmp: Path, seed: int = 0) -> torch.nn.Module:
    """An open_clip model built by open_clip: a registry name, or a config in a local-dir."""
    torch.manual_seed(seed)
    if isinstance(name_or_cfg, dict):
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "open_clip_config.json").write_text(json.dumps({"model_cfg": name_or_cfg}))
        name_or_cfg = f"local-dir:{tmp}"
    with quiet_logs():
        model = open_clip.create_model(name_or_cfg)
    return jitter(model, seed)


def inputs(image_size: int, context_length: int, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, image_size, image_size, generator=gen)
    return images, Tokenizer(context_length)(CAPTIONS)


def features(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple:
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(tokens)
    return img, txt


def zero_shot_logits(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    img, txt = (
        torch.nn.functional.normalize(img, dim=-1),
        torch.nn.functional.normalize(txt, dim=-1),
    )
    return scale.exp().reshape(()) * img @ txt.T


def assert_parity(ours: CLIP, ref: torch.nn.Module, size: int, ctx: int) -> dict[str, float]:
    """encode_image / encode_text within ATOL, zero-shot logits equal; returns the max diffs."""
    images, tokens = inputs(size, ctx)
    (a_img, a_txt), (b_img, b_txt) = features(ours, images, tokens), features(ref, images, tokens)
    torch.testing.assert_close(a_img, b_img, rtol=0, atol=ATOL)
    torch.testing.assert_close(a_txt, b_txt, rtol=0, atol=ATOL)
    a_log = zero_shot_logits(a_img, a_txt, ours.logit_scale)
    b_log = zero_shot_logits(b_img, b_txt, ref.logit_scale)
    torch.testing.assert_close(a_log, b_log, rtol=0, atol=1e-4)
    assert torch.equal(a_log.argmax(-1), b_log.argmax(-1))
    return {
        "image": (a_img - b_img).abs().max().item(),
        "text": (a_txt - b_txt).abs().max().item(),
        "logits": (a_log - b_log).abs().max().item(),
    }


# ---------------------------------------------------------------- import parity (open_clip)
def _import_case(name: str, quick: bool, tmp_path: Path) -> tuple[CLIP, torch.nn.Module, dict]:
    if name == "small":
        cfg = small_cfg(quick)
        ref = open_clip_model(cfg, tmp_path / "cfg")
        model_name: str | Path = tmp_path / "cfg" / "open_clip_config.json"
    else:
        model_name = f"{name}-quickgelu" if quick else name
        ref = open_clip_model(model_name, tmp_path)
        cfg = open_clip.get_model_config(model_name)
    # an open_clip training checkpoint: state_dict wrapper, DDP 'module.' prefixes
    ckpt = tmp_path / "epoch_1.pt"
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"epoch": 1, "name": "run", "state_dict": sd}, ckpt)
    ours, model_cfg, pre = interop.load_clip(ckpt, model_name)
    assert pre.size == cfg["vision_cfg"]["image_size"]
    return ours, ref, {"cfg": model_cfg, "open_clip_cfg": cfg}


@pytest.mark.parametrize("quick", [False, True], ids=["gelu", "quickgelu"])
def test_small_open_clip_config_imports_with_parity(tmp_path, quick) -> None:
    ours, ref, info = _import_case("small", quick, tmp_path)
    cfg: ModelConfig = info["cfg"]
    assert cfg.text_act == ("quick_gelu" if quick else "gelu")
    assert cfg.vision_kwargs["mlp_ratio"] == 3.0 and cfg.vision_kwargs["num_heads"] == 4
    assert (ours.visual.vit.blocks[0].mlp.act.__class__.__name__ == "QuickGELU") == quick
    print(assert_parity(ours, ref, 32, 16))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16"])
@pytest.mark.parametrize("quick", [False, True], ids=["gelu", "quickgelu"])
def test_open_clip_vit_b_imports_with_parity(tmp_path, name, quick) -> None:
    ours, ref, info = _import_case(name, quick, tmp_path)
    cfg: ModelConfig = info["cfg"]
    patch = name[-2:]
    assert cfg.vision_model == f"vit_base_patch{patch}_clip_{'quickgelu_' if quick else ''}224"
    assert cfg.vision_kwargs == {} and cfg.image_size == 224
    print(name, quick, assert_parity(ours, ref, 224, 77))


def test_safetensors_and_custom_text_layouts_read(tmp_path) -> None:
    ref = open_clip_model(small_cfg(False), tmp_path / "cfg")
    cfg_json = tmp_path / "cfg" / "open_clip_config.json"
    # CustomTextCLIP layout (text tower under 'text.'), as safetensors
    custom = {
        (k if k.startswith(("visual.", "logit_scale")) else f"text.{k}"): v.contiguous()
        for k, v in ref.state_dict().items()
    }
    save_file(custom, str(tmp_path / "w.safetensors"))
    ours, _, _ = interop.load_clip(tmp_path / "w.safetensors", cfg_json)
    assert_parity(ours, ref, 32, 16)


# ---------------------------------------------------------------- OpenAI layout
OPENAI_LIKE = small_cfg(True, head_width=64, text_width=128, mlp_ratio=4.0)  # OpenAI's shapes


def openai_release(tmp_path: Path) -> tuple[dict, Path, torch.nn.Module]:
    """An OpenAI-layout release from an open_clip model with OpenAI's shapes (64-wide heads):
    its state dict with the dtypes of OpenAI's files (linear and conv layers fp16, as open_clip
    converts them), that model as a TorchScript archive listing what OpenAI's archives list
    besides the weights, and open_clip's own build of the state dict (the peer, in fp32)."""
    model = open_clip_model(OPENAI_LIKE, tmp_path / "cfg")
    convert_weights_to_lp(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    peer = build_model_from_openai_state_dict(dict(sd), quick_gelu=True).float().eval()
    for key, value in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 49408)):
        if hasattr(model, key):
            delattr(model, key)  # open_clip keeps these as plain ints
        model.register_buffer(key, torch.tensor(value))
    archive = tmp_path / "ViT-tiny.pt"
    torch.jit.script(model).save(str(archive))
    return sd, archive, peer


def test_openai_torchscript_and_state_dict_import_with_parity(tmp_path) -> None:
    sd, archive, peer = openai_release(tmp_path)
    raw, jit = interop.read_state_dict(archive)
    assert jit and "input_resolution" not in raw and set(raw) == set(sd)
    torch.save(sd, tmp_path / "plain.pt")
    for path in (archive, tmp_path / "plain.pt"):
        ours, cfg, _ = interop.load_clip(path)  # no name: an OpenAI release, QuickGELU
        assert cfg.text_act == "quick_gelu" and cfg.vision_model.endswith("quickgelu_224")
        assert (cfg.text_heads, cfg.vision_kwargs["num_heads"]) == (2, 2)
        print(path.name, assert_parity(ours, peer, 32, 16))


def test_openai_layout_round_trip_is_bit_exact(tmp_path) -> None:
    sd, _, _ = openai_release(tmp_path)
    torch.save(sd, tmp_path / "plain.pt")
    ours, _, _ = interop.load_clip(tmp_path / "plain.pt")
    back = interop.to_openai_state_dict(ours)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].shape == value.shape and torch.equal(back[key], value.float()), key


# ---------------------------------------------------------------- export
def aclip_clip(overrides: list[str], seed: int = 0) -> tuple[CLIP, ModelConfig]:
    cfg = load_config(None, overrides).model
    torch.manual_seed(seed)
    return jitter(interop.build_clip(cfg), seed), cfg


def test_export_open_clip_loads_strictly_and_round_trips(tmp_path) -> None:
    clip, cfg = aclip_clip(CLIP_QUICKGELU_TINY_ARGS)
    pre = interop.Preprocess(32)
    written = interop.export_open_clip(clip, tmp_path / "oc", pre)
    assert written["model_cfg"]["vision_cfg"]["head_width"] == 16
    # strict: the weights file holds exactly the keys of the model open_clip builds
    with quiet_logs():
        ref, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    missing = ref.load_state_dict(load_file(str(tmp_path / "oc" / "open_clip_model.safetensors")))
    assert not missing.missing_keys and not missing.unexpected_keys
    ref.eval()
    images, tokens = inputs(32, 16)
    (a_img, a_txt), (b_img, b_txt) = features(clip, images, tokens), features(ref, images, tokens)
    print("export", (a_img - b_img).abs().max().item(), (a_txt - b_txt).abs().max().item())
    torch.testing.assert_close(b_img, a_img, rtol=0, atol=1e-6)
    torch.testing.assert_close(b_txt, a_txt, rtol=0, atol=1e-6)
    resize, crop = preprocess.transforms[:2]
    assert (resize.size, resize.interpolation.value, crop.size) == (32, "bicubic", (32, 32))
    # and back into aclip: bit-exact, same config
    back, back_cfg, back_pre = interop.load_clip(f"local-dir:{tmp_path / 'oc'}")
    assert back_pre == pre
    for key, value in clip.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert (back_cfg.vision_kwargs, back_cfg.text_act) == (dict(cfg.vision_kwargs), "quick_gelu")


@pytest.mark.slow
def test_timm_reads_the_openai_layout_export(tmp_path) -> None:
    """timm's own checkpoint filter maps the OpenAI-layout vision weights into its CLIP ViT-B/16;
    its head (= visual.proj) gives our projected image features."""
    clip, _ = aclip_clip(
        ["model.vision_model=vit_base_patch16_clip_224", "model.image_size=224",
         "model.text_width=64", "model.text_heads=1", "model.text_layers=1"]
    )  # fmt: skip
    sd = interop.to_openai_state_dict(clip)
    model = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=512)
    model.load_state_dict(checkpoint_filter_fn(sd, model))
    images, _ = inputs(224, 77)
    with torch.no_grad():
        diff = (model.eval()(images) - clip.encode_image(images)).abs().max().item()
    print("timm checkpoint_filter_fn", diff)
    assert diff <= 1e-6


def test_timm_folder_export(tmp_path) -> None:
    clip, _ = aclip_clip(CLIP_QUICKGELU_TINY_ARGS)
    interop.export_timm(clip, tmp_path / "timm", interop.Preprocess(32))
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    images, _ = inputs(32, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(images), clip.encode_image(images), rtol=0, atol=0)
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 32, 32) and data["crop_pct"] == 1.0


@pytest.mark.parametrize("name", ["test_vit", "test_vit2"], ids=["token_pool", "avg_pool"])
def test_plain_timm_trunk_exports_through_timm_model_name(tmp_path, name) -> None:
    """A non-CLIP timm ViT at its default size is an open_clip TimmModel trunk, loaded strictly."""
    clip, _ = aclip_clip(
        [f"model.vision_model={name}", "model.image_size=160", *CLIP_QUICKGELU_TINY_ARGS[3:-1]]
    )
    written = interop.export_open_clip(clip, tmp_path / "oc", interop.Preprocess(160))
    vision = written["model_cfg"]["vision_cfg"]
    assert vision["timm_model_name"] == name
    assert vision["timm_pool"] == ("token" if name == "test_vit" else "avg")
    with quiet_logs():
        ref, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    missing = ref.load_state_dict(load_file(str(tmp_path / "oc" / "open_clip_model.safetensors")))
    assert not missing.missing_keys and not missing.unexpected_keys
    ref.eval()
    images, tokens = inputs(160, 16)
    (a_img, a_txt), (b_img, b_txt) = features(clip, images, tokens), features(ref, images, tokens)
    torch.testing.assert_close(b_img, a_img, rtol=0, atol=1e-6)
    torch.testing.assert_close(b_txt, a_txt, rtol=0, atol=1e-6)
    back, back_cfg, _ = interop.load_clip(f"local-dir:{tmp_path / 'oc'}")
    assert back_cfg.vision_model == name and back_cfg.text_act == "gelu"
    assert all(torch.equal(back.state_dict()[k], v) for k, v in clip.state_dict().items())


def test_export_refuses_what_open_clip_cannot_express(tmp_path) -> None:
    demo_tower = [
        "model.vision_model=vit_tiny_patch16_224",
        "model.image_size=32",
        "model.vision_kwargs={patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}",
        *CLIP_QUICKGELU_TINY_ARGS[3:-1],
    ]
    clip, _ = aclip_clip(demo_tower)
    with pytest.raises(NotExpressible, match="default image size 224") as err:
        interop.export_open_clip(clip, tmp_path / "x", interop.Preprocess(32))
    assert "patch embedding has a bias" in str(err.value)
    assert not (tmp_path / "x").exists()
    clip224, _ = aclip_clip(
        ["model.vision_model=vit_tiny_patch16_224", "model.vision_kwargs={depth: 2}",
         *CLIP_QUICKGELU_TINY_ARGS[3:-1]]
    )  # fmt: skip
    with pytest.raises(NotExpressible, match="no extra arguments"):
        interop.export_open_clip(clip224, tmp_path / "x", interop.Preprocess(224))
    with pytest.raises(NotExpressible, match="not a CLIP-architecture vision tower"):
        interop.to_openai_state_dict(clip)
    mixed, _ = aclip_clip([*CLIP_QUICKGELU_TINY_ARGS[:-1], "model.text_act=gelu"])
    with pytest.raises(NotExpressible, match="one quick_gelu flag"):
        interop.export_open_clip(mixed, tmp_path / "x", interop.Preprocess(32))


# ---------------------------------------------------------------- refusals and adaptation
@pytest.fixture()
def small_ckpt(tmp_path) -> tuple[Path, Path, torch.nn.Module]:
    ref = open_clip_model(small_cfg(True), tmp_path / "cfg")
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    return tmp_path / "w.pt", tmp_path / "cfg" / "open_clip_config.json", ref


def test_missing_and_unknown_keys_are_named(tmp_path, small_ckpt) -> None:
    path, cfg_json, ref = small_ckpt
    sd = ref.state_dict()
    del sd["visual.ln_post.weight"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match=r"missing keys: visual\.vit\.norm\.weight "
                                           r"\(file: visual\.ln_post\.weight\)"):  # fmt: skip
        interop.load_clip(tmp_path / "missing.pt", cfg_json)
    sd = ref.state_dict()
    sd["visual.attn_pool.query"] = torch.zeros(4, 8)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(WeightsError, match=r"does not know: visual\.attn_pool\.query"):
        interop.load_clip(tmp_path / "extra.pt", cfg_json)


def test_wrong_shapes_are_named_with_both_shapes(small_ckpt) -> None:
    path, cfg_json, _ = small_ckpt
    cfg = interop.read_weights(path, cfg_json).model_cfg
    other = interop.build_clip(ModelConfig(**{**vars(cfg), "embed_dim": 40}))
    with pytest.raises(WeightsError) as err:
        interop.init_from(other, path, cfg_json)
    msg = str(err.value)
    assert "image_proj.weight (file: visual.proj): weights (48, 128) vs model (40, 128)" in msg
    assert "text_proj.weight (file: text_projection): weights (48, 64) vs model (40, 64)" in msg


def test_init_from_refuses_another_architecture(small_ckpt) -> None:
    path, cfg_json, _ = small_ckpt
    cfg = interop.read_weights(path, cfg_json).model_cfg
    gelu_text = interop.build_clip(ModelConfig(**{**vars(cfg), "text_act": "gelu"}))
    with pytest.raises(WeightsError, match="model.text_act=quick_gelu"):
        interop.init_from(gelu_text, path, cfg_json)
    gelu_vision = interop.build_clip(
        ModelConfig(**{**vars(cfg), "vision_model": "vit_base_patch16_clip_224"})
    )
    with pytest.raises(WeightsError, match="QuickGELU"):
        interop.init_from(gelu_vision, path, cfg_json)


def test_unsupported_open_clip_options_are_refused(tmp_path) -> None:
    cfg = small_cfg(False)
    cfg["vision_cfg"]["ls_init_value"] = 1e-5
    with pytest.raises(WeightsError, match=r"vision\.ls_init_value=1e-05"):
        interop.open_clip_model_config(cfg)
    with pytest.raises(WeightsError, match="init_logit_bias"):
        interop.open_clip_model_config(open_clip.get_model_config("ViT-B-16-SigLIP"))
    with pytest.raises(WeightsError, match="ResNet"):
        interop.open_clip_model_config(open_clip.get_model_config("RN50"))


def test_other_image_size_resamples_and_shorter_context_truncates(small_ckpt) -> None:
    path, cfg_json, _ = small_ckpt
    weights = interop.read_weights(path, cfg_json)
    bigger = interop.build_clip(
        ModelConfig(**{**vars(weights.model_cfg), "image_size": 48, "context_length": 12})
    )
    notes = interop.init_from(bigger, path, cfg_json)
    src = weights.state_dict["visual.vit.pos_embed"]
    want = resample_abs_pos_embed(src, [6, 6], (4, 4), num_prefix_tokens=1)
    assert torch.equal(bigger.visual.vit.pos_embed.detach(), want)
    torch.testing.assert_close(bigger.visual.vit.pos_embed[:, 0], src[:, 0], rtol=0, atol=0)
    pos = weights.state_dict["text.positional_embedding"]
    assert torch.equal(bigger.text.positional_embedding.detach(), pos[:12])
    assert any("4x4 -> 6x6" in n for n in notes) and any("16 -> 12" in n for n in notes)
    longer = interop.build_clip(ModelConfig(**{**vars(weights.model_cfg), "context_length": 20}))
    with pytest.raises(WeightsError, match="16 positions, the model's context length is 20"):
        interop.init_from(longer, path, cfg_json)


def test_file_without_architecture_needs_a_name(tmp_path) -> None:
    clip, _ = aclip_clip(CLIP_QUICKGELU_TINY_ARGS)
    interop.export_open_clip(clip, tmp_path / "oc", interop.Preprocess(32))
    with pytest.raises(WeightsError, match="width 48 is not a multiple of the head width 64"):
        interop.load_clip(tmp_path / "oc" / "open_clip_model.safetensors")  # read as OpenAI
    with pytest.raises(WeightsError, match="no such file"):
        interop.load_clip(tmp_path / "nothing.pt")


# ---------------------------------------------------------------- timm's CLIP names
@pytest.mark.slow
def test_every_timm_clip_tower_maps_to_a_config_that_rebuilds_it() -> None:
    """For each timm vit_*_clip_* model: its CLIP architecture -> (name, kwargs) -> the same."""
    checked = 0
    for name in timm.list_models("vit_*_clip_*"):
        with torch.device("meta"):
            vit = timm.create_model(name, pretrained=False, num_classes=0)
        if interop.clip_vision_problems(vit):
            continue  # e.g. register-token or avg-pool variants: not CLIP towers
        arch = interop.clip_vision_arch(vit)
        mapped, kwargs = interop.timm_vision_config(arch)
        with torch.device("meta"):
            again = timm.create_model(
                mapped, pretrained=False, num_classes=0, img_size=arch.image_size, **kwargs
            )
        assert interop.clip_vision_arch(again) == arch, (name, mapped, kwargs)
        checked += 1
    assert checked >= 25


def test_text_act_config_key() -> None:
    assert ModelConfig().text_act == "gelu"
    with pytest.raises(ValueError, match="model.text_act"):
        load_config(None, ["model.text_act=relu"])


# ---------------------------------------------------------------- A-CLIP on an imported tower
def test_token_keep_and_relevance_work_on_an_imported_clip_tower(tmp_path) -> None:
    """Token keep and the CLS relevance probe on an imported open_clip tower, against the same
    computation done by hand on open_clip's own modules."""
    ref = open_clip_model(small_cfg(True), tmp_path / "cfg")
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    ours, _, _ = interop.load_clip(tmp_path / "w.pt", tmp_path / "cfg" / "open_clip_config.json")
    images, _ = inputs(32, 16, n=3)
    keep_idx_BK = torch.tensor([[0, 3, 5, 6, 9, 15], [1, 2, 4, 8, 10, 11], [15, 14, 7, 0, 12, 13]])
    vis = ref.visual
    with torch.no_grad():
        tokens_BND = vis._embeds(images)  # conv1, class token, position embedding, ln_pre
        kept_BKD = torch.gather(tokens_BND[:, 1:], 1, keep_idx_BK[..., None].expand(-1, -1, 128))
        pooled_BD, _ = vis._pool(vis.transformer(torch.cat([tokens_BND[:, :1], kept_BKD], 1)))
        torch.testing.assert_close(
            ours.encode_image(images, keep_idx_BK), pooled_BD @ vis.proj, rtol=0, atol=ATOL
        )
        relevance_BN = torch.zeros(3, 16)
        x_BND = tokens_BND
        for blk in vis.transformer.resblocks:
            q_BND, k_BND, _ = F.linear(blk.ln_1(x_BND), blk.attn.in_proj_weight,
                                       blk.attn.in_proj_bias).chunk(3, dim=-1)  # fmt: skip
            q_BHd = q_BND[:, 0].reshape(3, 4, 32)
            k_BHNd = k_BND.reshape(3, 17, 4, 32).transpose(1, 2)
            att_BHN = (torch.einsum("bhd,bhnd->bhn", q_BHd, k_BHNd) * 32**-0.5).softmax(-1)
            relevance_BN += att_BHN[:, :, 1:].mean(1) / len(vis.transformer.resblocks)
            x_BND = blk(x_BND)
        _, ours_relevance_BN = ours.visual.forward_with_relevance(images)
    torch.testing.assert_close(ours_relevance_BN, relevance_BN, rtol=0, atol=1e-6)


def test_describe_prints_a_config_that_init_from_accepts(tmp_path, capsys, small_ckpt) -> None:
    """python -m aclip.interop PATH: the printed model section builds a model (with A-CLIP's
    heads) into which init_from loads the weights, giving open_clip's features."""
    path, cfg_json, ref = small_ckpt
    assert interop.main([str(path), "--model-name", str(cfg_json)]) == 0
    (tmp_path / "run.yaml").write_text(capsys.readouterr().out)
    cfg = load_config(tmp_path / "run.yaml", ["model.freeze_patch_embed=true"])
    model = build_model(cfg.model, cfg.loss)
    interop.init_from(model.clip, path, cfg_json)
    assert model.simclr_head is not None
    assert_parity(model.clip.eval(), ref, 32, 16)
    assert interop.main([str(tmp_path / "none.pt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_preprocess_matches_open_clips_transform(tmp_path) -> None:
    """The preprocess an export carries gives, through open_clip, what aclip's eval gives."""
    from PIL import Image

    clip, _ = aclip_clip(CLIP_QUICKGELU_TINY_ARGS)
    interop.export_open_clip(clip, tmp_path / "oc", interop.Preprocess(32))
    with quiet_logs():
        _, _, theirs = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    gen = torch.Generator().manual_seed(5)
    pixels = (torch.rand(45, 70, 3, generator=gen) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    _, _, pre = interop.load_clip(f"local-dir:{tmp_path / 'oc'}")
    torch.testing.assert_close(pre.transform()(image), theirs(image), rtol=0, atol=0)
    squash = interop.Preprocess(32, resize_mode="squash").transform()
    assert squash(image).shape == (3, 32, 32)
    with pytest.raises(WeightsError, match="use_ema needs an aclip run"):
        interop.load_clip(f"local-dir:{tmp_path / 'oc'}", use_ema=True)
