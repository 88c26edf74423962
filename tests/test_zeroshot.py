"""Zero-shot classification: classifier as open_clip builds it, metrics as CLIP_benchmark counts
them, ImageFolder trees and the `evals.zeroshot` command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import save_untrained_run
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from PIL import Image

import evals.zeroshot as zs_cli
from aclip.data.sets.imagefolder import (
    is_imagenet_tree,
    load_imagefolder_classification,
    load_templates,
    tree_classnames,
)
from aclip.eval.evaluate import (
    classification_metrics,
    mean_average_precision,
    zero_shot_classifier,
)
from aclip.tokenizer import Tokenizer

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red_square": (255, 0, 0)}
PER_CLASS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny untrained model saved as the trainer saves it: (run dir, CLIP, config)."""
    run = tmp_path_factory.mktemp("run")
    model, cfg = save_untrained_run(run)
    return run, model.clip, cfg


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """root/<colour>/<i>.png, PER_CLASS solid-colour PNGs per class."""
    root = tmp_path_factory.mktemp("tree")
    for name, rgb in COLOURS.items():
        (root / name).mkdir()
        for i in range(PER_CLASS):
            Image.new("RGB", (40 + i, 36), rgb).save(root / name / f"{i}.png")
    return root


# (a) classifier -------------------------------------------------------------------------


def test_classifier_matches_open_clip(tiny):
    _, clip, cfg = tiny
    tokenizer = Tokenizer(cfg.model.context_length)
    names, templates = list(IMAGENET_CLASSNAMES[:7]), list(OPENAI_IMAGENET_TEMPLATES[:5])
    ours = zero_shot_classifier(clip, tokenizer, names, templates, prompts_per_batch=10)
    ref = build_zero_shot_classifier(clip, tokenizer, names, templates, 3, "cpu", False)
    assert ours.shape == (cfg.model.embed_dim, 7)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_classifier_batching_matches_per_class(tiny):
    _, clip, cfg = tiny
    tokenizer = Tokenizer(cfg.model.context_length)
    names, templates = ["cat", "dog", "car"], ["a photo of a {c}.", "a {}."]
    per_class = torch.stack(
        [
            torch.nn.functional.normalize(
                clip.encode_text(
                    tokenizer([t.format(c=n) if "{c}" in t else t.format(n) for t in templates]),
                    normalize=True,
                ).mean(0),
                dim=-1,
            )
            for n in names
        ],
        dim=1,
    )
    for per_batch in (1, 4, 256):
        got = zero_shot_classifier(clip, tokenizer, names, templates, prompts_per_batch=per_batch)
        torch.testing.assert_close(got, per_class, atol=1e-6, rtol=0)


# (b) metrics ----------------------------------------------------------------------------


def _one_hot_logits(pred: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), num_classes).float()


def test_metrics_by_hand_micro_and_macro_differ():
    # labels 0,0,0,0,1,2 ; predicted 0,0,0,1,1,0
    # top-1 = 4/6 ; recall: class0 3/4, class1 1/1, class2 0/1 -> mean 1.75/3
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    m = classification_metrics(_one_hot_logits([0, 0, 0, 1, 1, 0], 3), labels, 3)
    assert m["top1"] == pytest.approx(4 / 6)
    assert m["mean_per_class_recall"] == pytest.approx(1.75 / 3)
    assert m["top5"] == pytest.approx(1.0)  # the key stays top5: top-3 with 3 classes
    assert "top3" not in m


def test_mean_recall_ignores_predicted_class_without_samples():
    # labels 0,0,1,1 ; predicted 0,2,1,1 ; class 2 has no sample (sklearn balanced accuracy):
    # recall class0 1/2, class1 2/2 -> 0.75 (not (0.5 + 1 + 0) / 3)
    labels = torch.tensor([0, 0, 1, 1])
    m = classification_metrics(_one_hot_logits([0, 2, 1, 1], 3), labels, 3)
    assert m["top1"] == pytest.approx(3 / 4)
    assert m["mean_per_class_recall"] == pytest.approx(0.75)


def test_top5_by_hand():
    # scores rank classes 5,4,3,2,1,0: label 0 is sixth (miss), label 1 is fifth (top-5 hit)
    logits = torch.arange(6.0).repeat(2, 1)
    m = classification_metrics(logits, torch.tensor([0, 1]), 6)
    assert m["top1"] == 0.0
    assert m["top5"] == pytest.approx(0.5)
    assert m["mean_per_class_recall"] == 0.0


# (c) ImageFolder and command line --------------------------------------------------------


def test_imagefolder_labels_and_names(tree):
    dataset, names, templates = load_imagefolder_classification(tree, None, None, "simple")
    assert names == ["blue", "green", "red square"]
    assert len(templates) == 7
    assert [label for _, label in dataset.samples] == [0] * 3 + [1] * 3 + [2] * 3
    assert dataset.classes == sorted(COLOURS)


def test_imagefolder_classnames_file_and_templates_file(tree, tmp_path):
    names_file = tmp_path / "names.txt"
    names_file.write_text("azure\nlime\ncrimson\n")
    templates_file = tmp_path / "templates.txt"
    templates_file.write_text("a photo of a {c}.\n\na {c} thing.\n")
    _, names, templates = load_imagefolder_classification(tree, None, names_file, templates_file)
    assert names == ["azure", "lime", "crimson"]
    assert templates == ["a photo of a {c}.", "a {c} thing."]


def test_imagenet_tree_takes_open_clip_names():
    wnids = [f"n{i:08d}" for i in range(1000)]
    assert is_imagenet_tree(wnids)
    assert tree_classnames(wnids) == list(IMAGENET_CLASSNAMES)
    assert not is_imagenet_tree(wnids[:999])
    assert len(load_templates("openai")) == 80


def test_bad_inputs_named(tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_imagefolder_classification(tmp_path / "nowhere")
    names_file = tmp_path / "two.txt"
    names_file.write_text("a\nb\n")
    with pytest.raises(ValueError, match="two.txt"):
        load_imagefolder_classification(tree, None, names_file)
    with pytest.raises(FileNotFoundError, match="no_templates"):
        load_templates(tmp_path / "no_templates.txt")


def test_cli_end_to_end(tiny, tree, tmp_path, capsys):
    run, _, _ = tiny
    out = tmp_path / "metrics.json"
    argv = ["--checkpoint", str(run), "--imagefolder", str(tree), "--templates", "simple"]
    rc = zs_cli.main([*argv, "--batch-size", "4", "--no-progress", "--json", str(out)])
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert metrics == json.loads(capsys.readouterr().out)
    assert metrics["n"] == len(COLOURS) * PER_CLASS
    assert set(metrics) == {"top1", "top5", "mean_per_class_recall", "n", "precision"}  # top-3
    assert metrics["precision"] == "fp32"  # the default --precision, recorded
    assert 0.0 <= metrics["top1"] <= 1.0 and metrics["top5"] == pytest.approx(1.0)


@pytest.mark.parametrize("case", ["no_tree", "no_checkpoint", "bad_classnames", "no_wds"])
def test_cli_bad_paths_exit_2_before_model_load(tiny, tree, tmp_path, capsys, monkeypatch, case):
    run, _, _ = tiny

    def no_load(*args, **kwargs):
        raise AssertionError("model loaded before the paths were checked")

    monkeypatch.setattr(zs_cli, "load_model", no_load)
    names_file = tmp_path / "names.txt"
    names_file.write_text("only_one\n")
    argv = {
        "no_tree": ["--checkpoint", str(run), "--imagefolder", str(tmp_path / "missing_tree")],
        "no_checkpoint": ["--checkpoint", str(tmp_path / "no_run"), "--imagefolder", str(tree)],
        "bad_classnames": [
            *("--checkpoint", str(run), "--imagefolder", str(tree)),
            *("--classnames", str(names_file)),
        ],
        "no_wds": ["--checkpoint", str(run), "--data", str(tmp_path / "missing_wds")],
    }[case]
    assert zs_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    expected = {
        "no_tree": "missing_tree",
        "no_checkpoint": "no_run",
        "bad_classnames": "names.txt",
        "no_wds": "missing_wds",
    }
    assert expected[case] in err


def test_cli_wds_set_and_python_entry_agree(tiny, tmp_path, capsys):
    from aclip.data.synthetic import write_synthetic

    run, _, _ = tiny
    write_synthetic(tmp_path, n_train=0, n_eval_cls=12, n_eval_ret=0, image_size=32,
                    samples_per_shard=5)  # fmt: skip
    data = str(tmp_path / "eval_cls")
    assert zs_cli.main(["--checkpoint", str(run), "--data", data, "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 12
    assert zs_cli.zeroshot(str(run), data, False, 5, "cpu", False) == metrics


def test_second_key_is_top5_for_any_number_of_classes():
    # 4 classes, label ranked 4th of 4 in one sample, 1st in the other: top-min(5, 4) = top-4
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    m = classification_metrics(logits, torch.tensor([3, 0]), 4)
    assert set(m) == {"top1", "top5", "mean_per_class_recall"}
    assert m["top1"] == pytest.approx(0.5) and m["top5"] == pytest.approx(1.0)


# (d) multilabel sets (CLIP_benchmark's .npy labels), mAP as CLIP_benchmark computes it --------


@pytest.fixture(scope="module")
def cb_sets(tmp_path_factory):
    from tests.cb_sets import write_clip_benchmark_sets

    return write_clip_benchmark_sets(tmp_path_factory.mktemp("clip_benchmark"))


def _clip_benchmark_map(logits: torch.Tensor, targets: torch.Tensor) -> float:
    from tests.cb_sets import clip_benchmark

    zc = clip_benchmark("metrics.zeroshot_classification")
    return zc.average_precision_per_class(logits, targets).mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_mean_average_precision_matches_clip_benchmark(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(60, 7, generator=gen)
    targets = (torch.rand(60, 7, generator=gen) < 0.3).float()
    targets[:, 6] = 0  # a class without positives counts 0, as in CLIP_benchmark
    got = mean_average_precision(logits, targets)
    assert got == pytest.approx(_clip_benchmark_map(logits, targets), abs=1e-6)
    assert classification_metrics(logits, targets, 7) == {"mean_average_precision": got}


def test_cli_multilabel_set_reports_clip_benchmark_map(tiny, cb_sets, capsys):
    import io
    import tarfile

    import numpy as np

    from aclip.data.sets.wds import load_wds_classification
    from aclip.data.views import eval_transform
    from aclip.eval.evaluate import zero_shot_logits

    run, clip, cfg = tiny
    data = cb_sets["cb_multilabel"]
    assert zs_cli.main(["--checkpoint", str(run), "--data", str(data), "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"mean_average_precision", "n", "precision"} and metrics["n"] == 8
    # the reference: CLIP_benchmark's AP on the same logits, targets read from the tar by numpy
    with tarfile.open(data / "test" / "0.tar") as tar:
        npys = sorted((m.name, tar.extractfile(m).read()) for m in tar if m.name.endswith(".npy"))
    targets = torch.tensor(np.stack([np.load(io.BytesIO(b)) for _, b in npys]))
    dataset, names, templates = load_wds_classification(data, eval_transform(cfg.model.image_size))
    classifier = zero_shot_classifier(clip, Tokenizer(cfg.model.context_length), names, templates)
    logits, labels = zero_shot_logits(clip, classifier, torch.utils.data.DataLoader(dataset))
    torch.testing.assert_close(labels, targets)
    want = _clip_benchmark_map(logits, targets)
    assert metrics["mean_average_precision"] == pytest.approx(want, abs=1e-6)


# (e) what is not an aclip checkpoint, and the final evaluation's error records ---------------


@pytest.mark.parametrize("case", ["other_project", "state_dict", "text_file"])
def test_cli_names_a_file_that_is_neither_an_aclip_checkpoint_nor_clip_weights(
    tree, tmp_path, capsys, case
):
    path = tmp_path / f"{case}.pt"
    if case == "other_project":  # a DeepSpeed-style file of another project: no config
        torch.save({"module": {"w": torch.zeros(2)}, "epoch": 3}, path)
    elif case == "state_dict":
        torch.save({"w": torch.zeros(2)}, path)
    else:
        path.write_text("image,caption\n")
    argv = ["--checkpoint", str(path), "--imagefolder", str(tree), "--no-progress"]
    assert zs_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot evaluate {path}: not an aclip checkpoint")
    assert "mp_rank_00_model_states.pt" in err
    assert "aclip.interop cannot read it as CLIP weights: " in err
    why = "not a readable checkpoint" if case == "text_file" else "keys: w"
    assert why in err


def test_cli_names_a_model_states_file_of_another_project(tree, tmp_path, capsys):
    path = tmp_path / "step" / "mp_rank_00_model_states.pt"  # the name, not aclip's content
    path.parent.mkdir()
    torch.save({"module": {"w": torch.zeros(2)}, "epoch": 3}, path)
    argv = ["--checkpoint", str(path), "--imagefolder", str(tree), "--no-progress"]
    assert zs_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} is not an aclip checkpoint: it lacks 'config'")


def test_evaluate_sets_records_a_failing_set_and_runs_the_others(tiny, tmp_path, capsys):
    from aclip.data.synthetic import write_synthetic
    from aclip.eval.evaluate import evaluate_sets

    _, clip, cfg = tiny
    write_synthetic(tmp_path, n_train=0, n_eval_cls=6, n_eval_ret=4, image_size=32,
                    samples_per_shard=8)  # fmt: skip
    tokenizer = Tokenizer(cfg.model.context_length)
    clip.train()
    results = evaluate_sets(
        clip, tokenizer, [str(tmp_path / "eval_cls"), str(tmp_path / "missing")],
        [str(tmp_path / "eval_cls"), str(tmp_path / "eval_ret")], cfg.model.image_size, 4,
    )  # fmt: skip
    assert clip.training  # the mode it came in
    clip.eval()
    assert results["zeroshot/eval_cls"]["n"] == 6
    assert results["zeroshot/missing"] == {
        "error": f"FileNotFoundError: evaluation set directory not found: {tmp_path / 'missing'}"
    }
    assert results["retrieval/eval_cls"]["error"].startswith("ValueError: evaluation set")
    assert results["retrieval/eval_ret"]["n_images"] == 4
    err = capsys.readouterr().err
    assert "evaluation zeroshot/missing" in err and "evaluation retrieval/eval_cls" in err
