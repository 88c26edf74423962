"""The evaluation-set format registry (aclip.data.sets.registry): a format from a new file is
read by the eval CLIs and the trainer; --data finds ImageFolder trees and Karpathy json by
their layout with the numbers of the explicit flags; unclaimed or doubly claimed paths are named."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN_ARGS, save_untrained_run, write_cli_data
from PIL import Image

import evals.retrieval as ret_cli
import evals.zeroshot as zs_cli
from aclip.data.sets.imagefolder import load_imagefolder_classification
from aclip.data.sets.karpathy import load_karpathy
from aclip.data.sets.registry import (
    SET_FORMATS,
    SetFormat,
    find_set_format,
    get_set_format,
    register_set_format,
)
from aclip.data.sets.wds import retrieval_collate
from aclip.data.views import eval_transform
from aclip.eval.evaluate import evaluate_sets, zero_shot_evaluate, zero_shot_on_wds
from aclip.eval.retrieval import evaluate_retrieval
from aclip.tokenizer import Tokenizer

CLASSES = ("blue_sky", "green", "red")
PER_CLASS = 3

PLUGIN_FILE = '''
"""A classification set listed in a CSV file of "image path,class name" rows (paths relative to
the file): a set format living outside aclip/data/sets/."""

import csv
from pathlib import Path

from torch.utils.data import Dataset

from aclip.data.decode import load_image_file
from aclip.data.sets.imagefolder import load_templates
from aclip.data.sets.registry import SetFormat, register_set_format


def _rows(path):
    with open(path, newline="") as f:
        rows = [(Path(path).parent / image, label) for image, label in csv.reader(f)]
    if not rows:
        raise ValueError(f"{path} lists no image")
    return rows


def claims(path):
    return path.suffix == ".csv"


def check(path, templates="openai"):
    for image, _ in _rows(path):
        if not image.is_file():
            raise FileNotFoundError(f"{path}: image missing: {image}")
    load_templates(templates)


class CsvSet(Dataset):
    def __init__(self, rows, classes, transform):
        self.rows, self.classes, self.transform = rows, classes, transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        image, label = self.rows[index]
        return self.transform(load_image_file(image)), self.classes.index(label)


def load(path, transform, templates="openai"):
    rows = _rows(path)
    classes = sorted({label for _, label in rows})
    names = [c.replace("_", " ") for c in classes]
    return CsvSet(rows, classes, transform), names, load_templates(templates)


register_set_format(
    SetFormat("test_csv", "classification", "a CSV list of image,class rows", claims, check,
              load, ("templates",))
)
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, torch.nn.Module, object]:
    """A tiny untrained aclip run: (run dir, CLIP, config)."""
    root = tmp_path_factory.mktemp("run")
    model, cfg = save_untrained_run(root)
    return root, model.clip, cfg


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """root/<class>/<i>.png, noisy images of a colour per class (ranks that are not all ties)."""
    root = tmp_path_factory.mktemp("tree")
    gen = torch.Generator().manual_seed(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(PER_CLASS):
            pixels = torch.randint(0, 256, (36, 40 + i, 3), generator=gen, dtype=torch.uint8)
            pixels[..., c] = 255
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def csv_format(tmp_path, monkeypatch):
    """The CSV format, registered by importing a new file; unregistered afterwards."""
    (tmp_path / "my_csv_format.py").write_text(PLUGIN_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_csv_format", raising=False)
    try:
        importlib.import_module("my_csv_format")
        yield SET_FORMATS[("test_csv", "classification")]
    finally:
        SET_FORMATS.pop(("test_csv", "classification"), None)
        sys.modules.pop("my_csv_format", None)


def _zeroshot(capsys, *argv: str) -> dict:
    assert zs_cli.main([*argv, "--batch-size", "4", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_format_from_a_new_file_is_read_by_zeroshot_data(run, tree, csv_format, capsys):
    listing = tree / "list.csv"  # the tree's images, in ImageFolder's order
    rows = [f"{name}/{i}.png,{name}" for name in CLASSES for i in range(PER_CLASS)]
    listing.write_text("\n".join(rows) + "\n")
    try:
        assert find_set_format(listing, "classification") is csv_format
        checkpoint = ["--checkpoint", str(run[0]), "--templates", "simple"]
        mine = _zeroshot(capsys, *checkpoint, "--data", str(listing))
        folder = _zeroshot(capsys, *checkpoint, "--imagefolder", str(tree))
        listed, names, _ = csv_format.load(listing, eval_transform(32))
    finally:
        listing.unlink()
    assert mine == folder and mine["n"] == len(CLASSES) * PER_CLASS
    dataset, want_names, _ = load_imagefolder_classification(tree, eval_transform(32))
    assert names == want_names == ["blue sky", "green", "red"]
    for (image, label), (want_image, want_label) in zip(listed, dataset, strict=True):
        assert label == want_label and torch.equal(image, want_image)


def test_imagefolder_tree_given_to_data_gives_the_imagefolder_metrics(run, tree, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("a sky\na field\na fire truck\n")
    for extra in ([], ["--templates", "simple", "--classnames", str(names)]):
        checkpoint = ["--checkpoint", str(run[0]), *extra]
        by_layout = _zeroshot(capsys, *checkpoint, "--data", str(tree))
        assert by_layout == _zeroshot(capsys, *checkpoint, "--imagefolder", str(tree))
        assert by_layout["n"] == len(CLASSES) * PER_CLASS


def test_unclaimed_path_is_refused_listing_the_formats(run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no classification set format reads") as err:
        find_set_format(empty, "classification")
    for name in ("wds", "imagefolder"):
        fmt = get_set_format(name, "classification")
        assert f"{fmt.name}: {fmt.expects}" in str(err.value)
    with pytest.raises(ValueError, match="karpathy: a Karpathy split json"):
        find_set_format(empty, "retrieval")
    assert zs_cli.main(["--checkpoint", str(run[0]), "--data", str(empty)]) == 2
    assert capsys.readouterr().err.startswith(f"error: no classification set format reads {empty}")
    with pytest.raises(FileNotFoundError, match="evaluation set directory not found"):
        find_set_format(tmp_path / "missing", "classification")


def test_a_path_two_formats_claim_is_refused_naming_both(tree):
    greedy = SetFormat("test_greedy", "classification", "anything", lambda p: True, print, print)
    register_set_format(greedy)
    try:
        with pytest.raises(ValueError, match="formats imagefolder and test_greedy"):
            find_set_format(tree, "classification")
        with pytest.raises(ValueError, match="empty or taken"):
            register_set_format(greedy)
    finally:
        SET_FORMATS.pop(("test_greedy", "classification"))


def test_options_a_format_does_not_take_are_refused(run, tmp_path, capsys):
    data = write_cli_data(tmp_path / "sets")
    argv = ["--checkpoint", str(run[0]), "--data", str(data / "eval_cls"), "--templates", "simple"]
    assert zs_cli.main(argv) == 2
    assert "templates does not apply to a wds set" in capsys.readouterr().err


def _write_karpathy(root: Path, count: int = 4) -> Path:
    records = []
    for n in range(count):
        Image.new("RGB", (20 + n, 16), (n * 40, 80, 160)).save(root / f"img{n}.jpg")
        sentences = [{"raw": f"caption {c} of image {n}"} for c in range(2)]
        records.append({"filename": f"img{n}.jpg", "split": "test", "sentences": sentences})
    path = root / "dataset_test.json"
    path.write_text(json.dumps({"images": records}))
    return path


def test_karpathy_json_given_to_retrieval_data(run, tmp_path, capsys):
    json_path = _write_karpathy(tmp_path)
    base = ["--checkpoint", str(run[0]), "--batch-size", "3", "--no-progress"]
    results = []
    for source in (["--karpathy-json", str(json_path)], ["--data", str(json_path)]):
        assert ret_cli.main([*base, *source, "--images", str(tmp_path)]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert ret_cli.main([*base, "--data", str(json_path)]) == 0  # images beside the json
    results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1] == results[2] and results[0]["n_images"] == 4


def test_trainer_evaluates_and_preflight_checks_every_format(run, tree, tmp_path, monkeypatch,
                                                             capsys):  # fmt: skip
    import train
    from aclip.config import load_config
    from aclip.train.preflight import check_paths

    _, clip, cfg = run
    data = write_cli_data(tmp_path / "sets")
    json_path = _write_karpathy(tmp_path)
    tokenizer = Tokenizer(cfg.model.context_length)
    size = cfg.model.image_size
    results = evaluate_sets(clip, tokenizer, [str(data / "eval_cls"), str(tree)], [str(json_path)],
                            size, 4)  # fmt: skip
    assert results["zeroshot/eval_cls"] == zero_shot_on_wds(
        clip, tokenizer, str(data / "eval_cls"), size, batch_size=4
    ) | {"precision": "fp32"}
    dataset, names, templates = load_imagefolder_classification(tree, eval_transform(size))
    want = zero_shot_evaluate(clip, tokenizer, dataset, names, templates, batch_size=4)
    assert results[f"zeroshot/{tree.name}"] == want | {"precision": "fp32"}
    loader = torch.utils.data.DataLoader(
        load_karpathy(json_path, tmp_path, transform=eval_transform(size)), batch_size=4,
        collate_fn=retrieval_collate,
    )  # fmt: skip
    want = evaluate_retrieval(clip, tokenizer, loader)
    assert results["retrieval/dataset_test.json"] == want | {"precision": "fp32"}
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    overrides = [*TINY_RUN_ARGS, f"data.train_shards={data}/train/{{00000..00001}}.tar",
                 f"train.output_dir={tmp_path / 'out'}", f"eval.zeroshot_sets=[{tree}]",
                 f"eval.retrieval_sets=[{json_path}]"]  # fmt: skip
    check_paths(load_config("configs/demo.yaml", overrides))  # both formats pass the pre-flight
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--config", "configs/demo.yaml", *overrides, f"eval.zeroshot_sets=[{empty}]"]
    monkeypatch.setattr(train, "run", lambda cfg: pytest.fail("the run started"))
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: eval.zeroshot_sets: no classification set format reads {empty}")
