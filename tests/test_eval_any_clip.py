"""Evaluating any CLIP: evals.zeroshot / retrieval / keep_ratio on an aclip run, its open_clip
export, an open_clip checkpoint (model name or open_clip_config.json) and an OpenAI file, each
checked against CLIP_benchmark's own evaluation code run on open_clip's model of the same weights.

The aclip run is trained through train.py (a CLIP-architecture tower) on the synthetic shards;
the other models are built and randomly initialised by open_clip itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from cb_sets import benchmark_retrieval, benchmark_zeroshot
from helpers import CLIP_TINY_ARGS, quiet_logs
from open_clip.model import build_model_from_openai_state_dict
from safetensors.torch import save_file

from aclip.data.sets.wds import load_wds_classification
from aclip.data.synthetic import write_synthetic
from aclip.eval.evaluate import classification_metrics, zero_shot_classifier
from aclip.interop import export as export_cli
from aclip.interop import load_clip
from aclip.interop.run import load_eval_model
from aclip.studies.keep_ratio import checkpoint_sweep
from aclip.tokenizer import Tokenizer
from evals import keep_ratio as keep_cli
from evals import retrieval as ret_cli
from evals import zeroshot as zs_cli
from evals.common import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLS_SETS = ("eval_cls", "eval_colour")
RECALL_KEYS = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]
# a small open_clip ViT (open_clip's own code builds it): 2 heads of 64 in both towers, so that
# OpenAI's layout (which records no head counts) reads it back as it is
OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 1},
}
REGISTERED = "aclip-test-tiny"  # OPEN_CLIP_CFG under a name in open_clip's registry


def same(mine: dict, peer: dict, keys: list[str]) -> None:
    """The metrics are equal: to 1e-6, far below one image in these sets (1/24), so the counts of
    hits are the same (one side is float32 arithmetic, the other float64)."""
    assert {k: mine[k] for k in keys} == pytest.approx({k: peer[k] for k in keys}, abs=1e-6)


def jittered(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter perturbed (zero biases and unit norms hide layout errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.eval()


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, n_train=64, n_eval_cls=24, n_eval_ret=12, image_size=40,
                    samples_per_shard=32, seed=0)  # fmt: skip
    return root


def train_tiny(run: Path, data: Path, *extra: str) -> None:
    """A few steps of the tiny CLIP-architecture model through train.py (fp32, ZeRO 0)."""
    argv = [
        "--config", "configs/demo.yaml", *CLIP_TINY_ARGS,
        "train.global_batch_size=8", "train.precision=fp32", "train.zero_stage=0",
        "train.progress=false", "train.stop_at_step=3", "train.ckpt_every=3",
        "train.image_log_every=0", "data.workers=0", "data.shuffle_buffer=16",
        f"data.train_shards={data}/train/{{00000..00001}}.tar", "eval.zeroshot_sets=[]",
        "eval.retrieval_sets=[]", f"train.output_dir={run}", "optim.lr=1e-3", *extra,
    ]  # fmt: skip
    assert train.main(argv) == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    """An A-CLIP run (attentive masking, EMA teacher) trained through train.py."""
    run = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        train_tiny(run, data)
    return run


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "open_clip"
    assert export_cli.main(["--checkpoint", str(run), "--out", str(out)]) == 0
    return out


def _open_clip_files(tmp: Path) -> dict[str, Path]:
    """OPEN_CLIP_CFG built by open_clip, saved as open_clip's trainer saves a checkpoint
    (``state_dict`` wrapper, ``module.`` prefixes), its config as a file and in the registry."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / f"{REGISTERED}.json").write_text(json.dumps(OPEN_CLIP_CFG))
    open_clip.add_model_config(tmp / f"{REGISTERED}.json")
    config = tmp / "open_clip_config.json"
    config.write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG}))
    torch.manual_seed(0)
    with quiet_logs():
        model = jittered(open_clip.create_model(REGISTERED), seed=0)
    ckpt = tmp / "epoch_3.pt"
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "name": "x", "state_dict": sd}, ckpt)
    safe = tmp / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(safe))
    return {"ckpt": ckpt, "safetensors": safe, "config": config}


def _openai_file(tmp: Path) -> Path:
    """An OpenAI-layout ViT (QuickGELU, 64-wide heads) as a plain state dict."""
    cfg = {**OPEN_CLIP_CFG, "quick_gelu": True}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(1)
    with quiet_logs():
        model = jittered(open_clip.create_model(f"local-dir:{tmp}"), seed=1)
    path = tmp / "ViT-tiny-openai.pt"
    torch.save(model.state_dict(), path)
    (tmp / "open_clip_config.json").unlink()  # a bare file, as OpenAI releases are
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory, exported) -> dict[str, tuple[list[str], tuple]]:
    """Each source kind: (its --checkpoint/--model-name arguments, (open_clip model, transform,
    tokenizer) of the same weights built by open_clip)."""
    tmp = tmp_path_factory.mktemp("sources")
    oc = _open_clip_files(tmp / "open_clip")
    openai = _openai_file(tmp / "openai")
    with quiet_logs():
        export_peer = open_clip.create_model_and_transforms(f"local-dir:{exported}")
        by_name = open_clip.create_model_and_transforms(REGISTERED, pretrained=str(oc["ckpt"]))
    sd = torch.load(openai, map_location="cpu", weights_only=True)
    openai_model = build_model_from_openai_state_dict(dict(sd)).float().eval()
    openai_model.load_state_dict(sd)  # the fp32 weights again (the builder casts to fp16)
    openai_tf = open_clip.image_transform(openai_model.visual.image_size, is_train=False)
    ctx = OPEN_CLIP_CFG["text_cfg"]["context_length"]
    return {
        "export": ([str(exported)], (export_peer[0], export_peer[2],
                                     open_clip.get_tokenizer(f"local-dir:{exported}"))),
        "local_dir": ([f"local-dir:{exported}"], (export_peer[0], export_peer[2],
                                                  open_clip.get_tokenizer(f"local-dir:{exported}"))),
        "open_clip_name": ([str(oc["ckpt"]), "--model-name", REGISTERED],
                           (by_name[0], by_name[2], open_clip.get_tokenizer(REGISTERED))),
        "open_clip_json": ([str(oc["safetensors"]), "--model-name", str(oc["config"])],
                           (by_name[0], by_name[2], open_clip.get_tokenizer(REGISTERED))),
        "openai": ([str(openai)], (openai_model, openai_tf,
                                   lambda texts: open_clip.tokenize(texts, context_length=ctx))),
    }  # fmt: skip


# ------------------------------------------------------------------ done-when 3
def test_clip_benchmark_on_the_export_gives_the_runs_numbers(run, exported, data, capsys):
    """CLIP_benchmark's own zero-shot and retrieval code on the exported folder (loaded by
    open_clip) give the top-1 / top-5 and R@1/5/10 that evals.zeroshot / evals.retrieval give
    on the aclip run."""
    with quiet_logs():
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{exported}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{exported}")
    model.eval()
    ours, _ = load_eval_model(run)
    for name in CLS_SETS:
        peer = benchmark_zeroshot(model, preprocess, tokenizer, data / name)
        mine = zs_cli.zeroshot(str(run), str(data / name), progress=False, batch_size=7)
        same(mine, peer, ["top1", "top5", "n"])
        # the same CLIP_benchmark code on aclip's own model: the logits the two models give
        ref = benchmark_zeroshot(ours, preprocess, tokenizer, data / name)
        diff = (ref["logits"] - peer["logits"]).abs().max().item()
        assert torch.equal(ref["logits"].argmax(1), peer["logits"].argmax(1)) and diff < 1e-4
        print(f"{name}: top1 {mine['top1']:.4f} top5 {mine['top5']:.4f} (both); "
              f"max |logit diff| open_clip vs aclip {diff:.2e}")  # fmt: skip
    peer = benchmark_retrieval(model, preprocess, tokenizer, data / "eval_ret")
    mine = ret_cli.retrieval(str(run), data=str(data / "eval_ret"), progress=False, batch_size=5)
    same(mine, peer, RECALL_KEYS)
    print("eval_ret: " + ", ".join(f"{k} {mine[k]:.4f}" for k in RECALL_KEYS))


# ------------------------------------------------------------------ each source kind, each CLI
SLOW = pytest.mark.slow


@pytest.mark.parametrize("kind", ["export", pytest.param("local_dir", marks=SLOW),
                                  "open_clip_name", pytest.param("open_clip_json", marks=SLOW),
                                  "openai"])  # fmt: skip
def test_zeroshot_and_retrieval_clis_on_each_source_match_clip_benchmark(
    sources, data, kind, capsys, tmp_path
):
    args, (model, transform, tokenizer) = sources[kind]
    out = tmp_path / "cls.json"
    argv = ["--checkpoint", *args, "--data", str(data / "eval_cls"), "--no-progress"]
    assert zs_cli.main([*argv, "--batch-size", "6", "--json", str(out)]) == 0
    mine = json.loads(out.read_text())
    peer = benchmark_zeroshot(model, transform, tokenizer, data / "eval_cls")
    same(mine, peer, ["top1", "top5", "n"])
    out = tmp_path / "ret.json"
    argv = ["--checkpoint", *args, "--data", str(data / "eval_ret"), "--no-progress"]
    assert ret_cli.main([*argv, "--json", str(out)]) == 0
    mine = json.loads(out.read_text())
    peer = benchmark_retrieval(model, transform, tokenizer, data / "eval_ret")
    same(mine, peer, RECALL_KEYS)


def test_load_model_names_the_source_and_its_preprocess(sources, run) -> None:
    assert load_model(run).source == "aclip" and load_model(run).is_aclip_run
    expected = {"export": "open_clip", "local_dir": "open_clip", "open_clip_name": "open_clip",
                "open_clip_json": "open_clip", "openai": "openai"}  # fmt: skip
    for kind, (args, _) in sources.items():
        name = args[2] if len(args) > 2 else None
        model = load_model(args[0], name)
        assert model.source == expected[kind] and not model.is_aclip_run
        assert model.context_length == 16 and model.preprocess.size == 32


def _own_tower_attentive_top1(clip, data: Path, transform, ratio: float) -> float:
    """Zero-shot top-1 (%) keeping, per image, the k patches the model's own vision tower finds
    most relevant (its CLS attention, all tokens, the same image), computed here step by step."""
    dataset, names, templates = load_wds_classification(data, transform)
    classifier = zero_shot_classifier(clip, Tokenizer(16), names, templates, "cpu")
    images = torch.stack([img for img, _ in dataset])
    labels = torch.tensor([label for _, label in dataset])
    k = round(ratio * clip.visual.num_patches)
    with torch.no_grad():
        relevance_BN = clip.visual.forward_with_relevance(images)[1]
        keep_BK = relevance_BN.topk(k, dim=1).indices.sort(dim=1).values
        emb = clip.encode_image(images, keep_BK, normalize=True)
    metrics = classification_metrics(emb @ classifier, labels, len(names))
    return 100.0 * metrics["top1"]


@pytest.mark.parametrize("kind", ["export", pytest.param("open_clip_name", marks=SLOW), "openai"])
def test_keep_ratio_checkpoint_on_a_pretrained_clip_uses_its_own_tower(
    sources, data, kind, tmp_path, capsys
):
    args, (model, transform, tokenizer) = sources[kind]
    out = tmp_path / "keep"
    argv = ["checkpoint", "--checkpoint", *args, "--data", str(data / "eval_cls"),
            "--out", str(out), "--keep-ratios", "1.0", "0.5", "--workers", "0",
            "--batch-size", "8"]  # fmt: skip
    assert keep_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "has no EMA teacher: the attentive rows keep the patches its own vision tower" in printed
    assert "| attentive | 0.5 | 8 |" in printed and "own tower |" in printed
    rows = {r["strategy"]: r for r in json.loads((out / "results.json").read_text())}
    assert rows["attentive"]["relevance_from"] == "own_tower"
    assert rows["none"]["relevance_from"] == rows["random"]["relevance_from"] == ""
    peer = benchmark_zeroshot(model, transform, tokenizer, data / "eval_cls")
    assert rows["none"]["top1"] == pytest.approx(100.0 * peer["top1"], abs=1e-4)
    ours = load_model(args[0], args[2] if len(args) > 2 else None)
    want = _own_tower_attentive_top1(ours.clip, data / "eval_cls", ours.transform, 0.5)
    assert rows["attentive"]["top1"] == pytest.approx(want, abs=1e-4)


def test_keep_ratio_checkpoint_on_an_aclip_run_uses_its_ema_teacher(run, data, tmp_path):
    rows = checkpoint_sweep(run, data / "eval_cls", [1.0, 0.5], ["attentive"], 8)
    assert [r["relevance_from"] for r in rows] == ["", "ema_teacher"]


# ------------------------------------------------------------------ refusals
def test_options_that_do_not_apply_are_refused(run, exported, sources, data, capsys) -> None:
    cls = ["--data", str(data / "eval_cls"), "--no-progress"]
    assert zs_cli.main(["--checkpoint", str(exported), "--ema", *cls]) == 2
    assert "--ema takes the EMA teacher of an aclip run" in capsys.readouterr().err
    assert zs_cli.main(["--checkpoint", str(run), "--model-name", "ViT-B-16", *cls]) == 2
    assert "is an aclip run, which carries its own config" in capsys.readouterr().err
    assert zs_cli.main(["--checkpoint", str(exported), "--model-name", "ViT-B-16", *cls]) == 2
    assert "names its model in its open_clip_config.json" in capsys.readouterr().err
    args = sources["open_clip_name"][0]
    assert ret_cli.main(["--checkpoint", args[0], "--model-name", "no-such-model",
                         "--data", str(data / "eval_ret"), "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "aclip.interop cannot read it as CLIP weights" in err and "no-such-model" in err
    missing = str(exported) + "_gone"
    for cli_main in (zs_cli.main, ret_cli.main):
        assert cli_main(["--checkpoint", missing, *cls]) == 2
        assert f"no checkpoint at {missing}" in capsys.readouterr().err


def test_imported_model_matches_load_clip(sources) -> None:
    """load_model is load_clip for anything that is not an aclip run (same weights, same
    preprocess): the CLIs evaluate what aclip.interop imports."""
    args, _ = sources["open_clip_name"]
    model = load_model(args[0], REGISTERED)
    clip, _, pre = load_clip(args[0], REGISTERED)
    assert model.preprocess == pre
    for key, value in clip.state_dict().items():
        assert torch.equal(model.clip.state_dict()[key], value), key


# ------------------------------------------------------------------ the export command line
def test_the_export_cli_replaces_its_folder_and_the_printed_lines_load_it(run, tmp_path, capsys):
    """`python -m aclip.export --overwrite` exports a run as an open_clip folder (again on a
    second call) and prints the lines that load it; run as printed, they give the run's features."""
    folder = tmp_path / "demo_out" / "open_clip"
    argv = ["--checkpoint", str(run), "--out", str(folder), "--overwrite"]
    for _ in range(2):  # the second call replaces the folder
        assert export_cli.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    load = f'open_clip.create_model_and_transforms("local-dir:{folder}")'
    two = ["import open_clip", f"model, _, preprocess = {load}"]
    assert [line.strip() for line in printed[-3:-1]] == two
    namespace: dict = {}
    with quiet_logs():
        exec("\n".join(two), namespace)  # the two lines, as a user pastes them
    ours, cfg = load_eval_model(run)
    images = torch.randn(2, 3, cfg.model.image_size, cfg.model.image_size)
    tokens = Tokenizer(cfg.model.context_length)(["a red circle", "a blue star"])
    model = namespace["model"].eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ours.encode_image(images),
                                   rtol=0, atol=1e-6)  # fmt: skip
        torch.testing.assert_close(model.encode_text(tokens), ours.encode_text(tokens),
                                   rtol=0, atol=1e-6)  # fmt: skip
