"""The one reader: every kind of model path classified (``aclip.interop.source.classify``) and
loaded (``aclip.interop.reader.load_model``) with the weights it holds, bit for bit; a timm
export, another folder and an ``hf-hub:`` name missing from the local cache refused, saying why.

The files are written by aclip's own exporters from one small CLIP with OpenAI's 64-wide heads
(so that an OpenAI-layout file, which records no head counts, reads back as the same model), and a
run as the trainer saves one; the ``hf-hub:`` name is read from a Hugging Face cache laid out
under ``HF_HUB_CACHE`` as huggingface_hub lays it out. Nothing is downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import save_untrained_run, tiny_config

from aclip.config import load_config
from aclip.interop import WeightsError, init_from, read_weights
from aclip.interop.reader import check_model_source, load_model
from aclip.interop.run import MODEL_STATES
from aclip.interop.source import (
    ACLIP_RUN,
    FOLDER,
    OPEN_CLIP_DIR,
    OPEN_CLIP_FILE,
    OPENAI_FILE,
    TIMM_DIR,
    classify,
)
from aclip.interop.weights import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, Preprocess
from aclip.interop.write import export_open_clip, export_timm, to_openai_state_dict
from aclip.model import build_clip
from aclip.train.preflight import check_paths

# one block per tower, 64-wide heads (OpenAI's), QuickGELU: every format can hold it exactly
OPENAI_TINY_ARGS = [
    "model.vision_model=vit_base_patch16_clip_quickgelu_224",
    "model.image_size=32",
    "model.vision_kwargs={patch_size: 8, depth: 1, embed_dim: 64, num_heads: 1}",
    "model.embed_dim=32",
    "model.context_length=16",
    "model.text_width=64",
    "model.text_layers=1",
    "model.text_heads=1",
    "model.text_act=quick_gelu",
]
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The CLIP and each file or folder that holds it, plus a run and a timm export."""
    tmp = tmp_path_factory.mktemp("reader")
    torch.manual_seed(0)
    clip = build_clip(load_config(None, OPENAI_TINY_ARGS).model).eval()
    with torch.no_grad():  # no zero biases or unit norms to hide a layout error
        for param in clip.parameters():
            param.add_(torch.randn(param.shape) * 0.02)
    export_open_clip(clip, tmp / "export", Preprocess(32))
    torch.save(to_openai_state_dict(clip), tmp / "openai.pt")
    export_timm(clip, tmp / "timm", Preprocess(32))
    (tmp / "other").mkdir()
    (tmp / "other" / "notes.txt").write_text("not a model")
    run_model, _ = save_untrained_run(tmp / "run")
    return {"clip": clip, "tmp": tmp, "run": tmp / "run", "run_clip": run_model.clip}


@pytest.fixture
def hf_cache(files, tmp_path, monkeypatch) -> Path:
    """A Hugging Face hub cache holding ``org/tiny-clip`` (the export) as huggingface_hub
    stores a download: ``models--org--tiny-clip/snapshots/<rev>/`` and ``refs/main``."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-clip"
    shutil.copytree(files["tmp"] / "export", repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return repo / "snapshots" / REVISION


def _same_weights(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    mine, want = ours.state_dict(), theirs.state_dict()
    assert set(mine) == set(want)
    for key, value in want.items():
        assert torch.equal(mine[key], value), key


def test_each_kind_of_path_is_classified(files, hf_cache) -> None:
    tmp, run = files["tmp"], files["run"]
    tag = run / "checkpoints" / "global_step0"
    kinds = {
        str(run): ACLIP_RUN,
        str(run / "checkpoints"): ACLIP_RUN,
        str(tag): ACLIP_RUN,
        str(tag / MODEL_STATES): ACLIP_RUN,
        str(tmp / "export"): OPEN_CLIP_DIR,
        f"local-dir:{tmp / 'export'}": OPEN_CLIP_DIR,
        "hf-hub:org/tiny-clip": OPEN_CLIP_DIR,
        str(tmp / "openai.pt"): OPENAI_FILE,
        str(tmp / "timm"): TIMM_DIR,
        f"local-dir:{tmp / 'timm'}": TIMM_DIR,
        str(tmp / "other"): FOLDER,
    }
    for path, kind in kinds.items():
        assert classify(path).kind == kind, path
    weights = tmp / "export" / OPEN_CLIP_WEIGHTS
    assert classify(weights, tmp / "export" / OPEN_CLIP_CONFIG).kind == OPEN_CLIP_FILE
    assert classify(weights).kind == OPENAI_FILE  # no model name: read as an OpenAI release
    assert classify("hf-hub:org/tiny-clip").path == hf_cache
    assert classify(f"local-dir:{tmp / 'export'}").path == tmp / "export"


def test_each_kind_of_path_loads_its_weights(files, hf_cache) -> None:
    tmp, clip = files["tmp"], files["clip"]
    config = str(tmp / "export" / OPEN_CLIP_CONFIG)
    cases = [
        ((str(tmp / "export"), None), "open_clip"),
        ((f"local-dir:{tmp / 'export'}", None), "open_clip"),
        (("hf-hub:org/tiny-clip", None), "open_clip"),
        ((str(tmp / "export" / OPEN_CLIP_WEIGHTS), config), "open_clip"),
        ((str(tmp / "openai.pt"), None), "openai"),
    ]
    for (path, name), source in cases:
        loaded = load_model(path, name)
        assert loaded.source == source and not loaded.is_aclip_run, path
        assert loaded.context_length == 16 and loaded.preprocess.size == 32, path
        _same_weights(loaded.clip, clip)
    run = load_model(files["run"])
    assert run.source == "aclip" and run.run_config is not None
    _same_weights(run.clip, files["run_clip"])


def test_hf_hub_name_reads_the_cached_snapshot_through_every_reader(files, hf_cache) -> None:
    weights = read_weights("hf-hub:org/tiny-clip")
    assert weights.source == "open_clip" and str(hf_cache) in weights.notes[0]
    fresh = build_clip(load_config(None, OPENAI_TINY_ARGS).model)
    init_from(fresh, "hf-hub:org/tiny-clip")
    _same_weights(fresh, files["clip"])
    check_model_source("hf-hub:org/tiny-clip")  # cached: accepted before any data is read


def test_hf_hub_name_not_in_the_cache_is_refused(files, hf_cache) -> None:
    for refuse in (check_model_source, load_model, read_weights, classify):
        with pytest.raises(WeightsError, match="not in the local Hugging Face cache") as info:
            refuse("hf-hub:org/absent")
        assert "nothing is downloaded at run time" in str(info.value)
    cfg = tiny_config(str(files["tmp"] / "out"), **{"model.init_from": "hf-hub:org/absent"})
    with pytest.raises(FileNotFoundError, match="model.init_from: hf-hub:org/absent: not in"):
        check_paths(cfg)  # train.py's pre-flight, before any data or model is read


def test_a_timm_export_is_refused_with_how_to_load_it(files) -> None:
    timm_dir = files["tmp"] / "timm"
    want = f'a timm model folder.*image tower alone.*timm.create_model\\("local-dir:{timm_dir}"'
    with pytest.raises(WeightsError, match=want):
        read_weights(timm_dir)
    with pytest.raises(WeightsError, match="cannot evaluate .*a timm model folder"):
        load_model(timm_dir)
    with pytest.raises(WeightsError, match="a timm model folder"):
        init_from(build_clip(load_config(None, OPENAI_TINY_ARGS).model), f"local-dir:{timm_dir}")


def test_other_paths_are_refused_saying_what_they_are(files) -> None:
    tmp = files["tmp"]
    with pytest.raises(WeightsError, match="neither an aclip run nor an open_clip folder"):
        load_model(tmp / "other")
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at {tmp / 'gone'}"):
        load_model(tmp / "gone")
    with pytest.raises(ValueError, match="is an aclip run, which carries its own config"):
        load_model(files["run"], "ViT-B-16")
    with pytest.raises(ValueError, match="--ema takes the EMA teacher of an aclip run"):
        load_model(tmp / "export", use_ema=True)
