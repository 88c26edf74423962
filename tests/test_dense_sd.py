"""CLIPer's Stable Diffusion compensation on a tiny randomly initialised UNet and VAE built from
diffusers configs (nothing downloaded): the recorded maps are the UNet's own self-attention, the
normalisation and product equal the written steps, a saved folder loads back, and the
segmenter runs with the refinement."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from aclip.dense.sd import (  # noqa: E402
    DEFAULT_LAYERS,
    SDAffinity,
    combine_maps,
    normalise_maps,
    refine_maps,
)

CROSS_DIM = 16


def tiny_unet() -> torch.nn.Module:
    """SD's block layout (3 cross-attention down blocks, a plain one; mirrored up blocks) at toy
    size: 8x8 latents, so up_blocks[3] attends over 64 tokens with 4 heads."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 8, 8, 8), norm_num_groups=4, cross_attention_dim=CROSS_DIM,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()  # fmt: skip


def tiny_vae() -> torch.nn.Module:
    torch.manual_seed(1)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16,
    ).eval()  # fmt: skip


def scheduler():
    return diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1)


def prompt() -> torch.Tensor:
    return torch.randn(1, 7, CROSS_DIM, generator=torch.Generator().manual_seed(3))


def image01() -> torch.Tensor:
    return torch.rand(1, 3, 30, 40, generator=torch.Generator().manual_seed(4))


def test_recorded_maps_are_the_unets_self_attention() -> None:
    unet = tiny_unet()
    sd = SDAffinity(unet, tiny_vae(), scheduler(), prompt())
    assert sd.image_size == 16
    # the inputs of the recorded layers, caught independently by forward pre-hooks
    seen = {}
    modules = dict(unet.named_modules())
    handles = [modules[n].register_forward_pre_hook(
        lambda m, args, kw, n=n: seen.__setitem__(n, args[0] if args else kw["hidden_states"]),
        with_kwargs=True) for n in DEFAULT_LAYERS]  # fmt: skip
    maps = sd.attention_maps(image01())
    for h in handles:
        h.remove()
    attn = modules[DEFAULT_LAYERS[0]]
    assert maps.shape == (2 * attn.heads, 64, 64)
    torch.testing.assert_close(maps.sum(-1), torch.ones(8, 64), rtol=0, atol=1e-5)
    for i, name in enumerate(DEFAULT_LAYERS):
        layer, x = modules[name], seen[name][0]
        q = layer.to_q(x).reshape(64, layer.heads, -1).transpose(0, 1)
        k = layer.to_k(x).reshape(64, layer.heads, -1).transpose(0, 1)
        want = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        torch.testing.assert_close(maps[i * 4 : (i + 1) * 4], want, rtol=0, atol=1e-5)


def test_recording_does_not_change_the_unet() -> None:
    base, rec = tiny_unet(), tiny_unet()
    SDAffinity(rec, tiny_vae(), scheduler(), prompt())
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = base(x, 10, encoder_hidden_states=prompt()).sample
        b = rec(x, 10, encoder_hidden_states=prompt()).sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_normalise_and_combine_equal_the_written_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 5, 5, generator=gen).softmax(-1)
    got = normalise_maps(maps, threshold=0.5)
    want = np.zeros((3, 5, 5))
    m = maps.double().numpy()
    for h in range(3):
        col_max = [max(m[h, i, j] for i in range(5)) for j in range(5)]
        a = [[m[h, i, j] / (col_max[j] + 1e-5) for j in range(5)] for i in range(5)]
        a = [[v if v >= 0.5 else 0.0 for v in row] for row in a]
        want[h] = [[v / (sum(row) + 1e-5) for v in row] for row in a]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    torch.testing.assert_close(combine_maps(got, "sfsa"), got[0] @ got[1] @ got[2])
    torch.testing.assert_close(combine_maps(got, "mean"), got.mean(0))
    coarse = torch.rand(2, 3, 4, generator=gen)
    aff = torch.rand(25, 25, generator=gen)
    cross = F.interpolate(coarse[None], size=(5, 5), mode="bilinear")[0].flatten(1)
    torch.testing.assert_close(refine_maps(coarse, aff), (aff @ cross.T).T.reshape(2, 5, 5))


def test_a_saved_folder_loads_back(tmp_path) -> None:
    from safetensors.torch import save_file

    unet, vae, sched = tiny_unet(), tiny_vae(), scheduler()
    unet.save_pretrained(tmp_path / "unet")
    vae.save_pretrained(tmp_path / "vae")
    sched.save_pretrained(tmp_path / "scheduler")
    save_file({"prompt_embeds": prompt()}, str(tmp_path / "empty_prompt_embeds.safetensors"))
    assert json.loads((tmp_path / "scheduler/scheduler_config.json").read_text())["_class_name"]
    loaded = SDAffinity.from_folder(tmp_path)
    direct = SDAffinity(tiny_unet(), tiny_vae(), scheduler(), prompt())
    torch.testing.assert_close(loaded.attention_maps(image01()), direct.attention_maps(image01()))
    with pytest.raises(FileNotFoundError, match="not a diffusers folder"):
        SDAffinity.from_folder(tmp_path / "unet")


def test_segmenter_with_the_refinement() -> None:
    from aclip.dense.segment import Segmenter
    from aclip.dense.settings import SegSettings
    from aclip.tokenizer import Tokenizer
    from tests.test_dense import small_clip

    sd = SDAffinity(tiny_unet(), tiny_vae(), scheduler(), prompt())
    s = SegSettings(head="cliper", short_side=32, slide_crop=16, slide_stride=8, refine="sfsa",
                    sd_model="(given)", attention_thr=0.1, bkg_thd=0.3)  # fmt: skip
    names = ["background", "cat", "dog"]
    seg = Segmenter(small_clip(), Tokenizer(16), names, s, ["a photo of a {}."], 0,
                    (0.5,) * 3, (0.25,) * 3, sd=sd)  # fmt: skip
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    labels, maps = seg.predict(image)
    assert labels.shape == (30, 40) and maps.shape == (2, 30, 40)
    assert set(labels.unique().tolist()) <= {0, 1, 2}
    unrefined = SegSettings(**{**s.__dict__, "refine": "none"})
    plain = Segmenter(small_clip(), Tokenizer(16), names, unrefined, ["a photo of a {}."], 0,
                      (0.5,) * 3, (0.25,) * 3)  # fmt: skip
    assert not torch.allclose(plain.predict(image)[1], maps)
