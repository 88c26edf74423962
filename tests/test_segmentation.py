"""Segmentation evaluation: mIoU / pixel accuracy against the formula and torchmetrics, the
readers on tiny trees of every layout, the settings files, the synthetic set, and the command
line end to end (an open_clip folder through aclip.interop, an aclip run through
load_eval_model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from helpers import quiet_logs
from PIL import Image
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from aclip.config import load_config
from aclip.data.sets import segclasses
from aclip.data.sets.segmentation import DATASETS, SETS, SegmentationSet, reduce_zero_label
from aclip.data.synthetic import COLOURS, seg_classnames, write_segmentation_set
from aclip.dense.heads import HEADS
from aclip.dense.metric import SegMetric
from aclip.dense.protocols import clip_labels, mmseg_size, patch_rounded_size
from aclip.dense.settings import (
    Queries,
    SegSettings,
    class_max,
    load_settings,
    resolve_classnames,
)
from aclip.model import build_model
from evals import segmentation as cli

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- metric
LABELS = [np.array([[0, 0, 1], [1, 2, 255]]), np.array([[2, 2], [0, 1]])]
PREDS = [np.array([[0, 1, 1], [1, 1, 0]]), np.array([[2, 0], [0, 1]])]


def test_metric_equals_the_formula_on_hand_made_maps() -> None:
    m = SegMetric(num_classes=4)  # class 3: in neither labels nor predictions -> left out
    for p, t in zip(PREDS, LABELS, strict=True):
        m.update(p, t)
    r = m.compute()
    # summed over both images (the 255 pixel ignored, its prediction too):
    # class 0: label 3 px, pred 3, both 2 -> 2 / (3 + 3 - 2);  class 1: label 3, pred 5, both 3
    # -> 3 / 5;  class 2: label 3, pred 1, both 1 -> 1 / 3;  class 3: empty union -> None
    assert r["IoU"][:3] == pytest.approx([2 / 4, 3 / 5, 1 / 3]) and r["IoU"][3] is None
    assert r["mIoU"] == pytest.approx((2 / 4 + 3 / 5 + 1 / 3) / 3)
    assert r["aAcc"] == pytest.approx(6 / 9)  # 9 labelled pixels, 6 right
    assert r["Acc"][:3] == pytest.approx([2 / 3, 3 / 3, 1 / 3]) and r["n"] == 2
    # not the mean of per-image IoUs
    per_image = [SegMetric(4) for _ in PREDS]
    for mm, p, t in zip(per_image, PREDS, LABELS, strict=True):
        mm.update(p, t)
    assert np.mean([mm.compute()["mIoU"] for mm in per_image]) != pytest.approx(r["mIoU"])


def test_metric_matches_torchmetrics() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (3, 20, 24), generator=gen)
    labels[:, :2] = 255
    preds = torch.randint(0, 6, (3, 20, 24), generator=gen)
    m = SegMetric(6)
    for p, t in zip(preds, labels, strict=True):
        m.update(p, t)
    r = m.compute()
    iou = MulticlassJaccardIndex(6, average="none", ignore_index=255)(preds, labels)
    acc = MulticlassAccuracy(6, average="micro", ignore_index=255)(preds, labels)
    recall = MulticlassAccuracy(6, average="none", ignore_index=255)(preds, labels)
    macro = MulticlassJaccardIndex(6, average="macro", ignore_index=255)(preds, labels)
    assert r["IoU"] == pytest.approx(iou.tolist(), abs=1e-6)
    assert r["mIoU"] == pytest.approx(macro.item(), abs=1e-6)  # every class present here
    assert r["aAcc"] == pytest.approx(acc.item(), abs=1e-6)
    assert r["Acc"] == pytest.approx(recall.tolist(), abs=1e-6)


def test_prediction_of_no_class_counts_against_the_label() -> None:
    m = SegMetric(2)
    m.update(np.array([[255, 1]]), np.array([[0, 1]]))
    r = m.compute()
    assert r["IoU"] == [0.0, 1.0] and r["aAcc"] == 0.5


def test_reduce_zero_label_is_mmsegs() -> None:
    got = reduce_zero_label(np.array([[0, 1, 2, 255]]))
    assert got.tolist() == [[255, 0, 1, 255]]


# ---------------------------------------------------------------- the CLIP protocol
def test_clip_labels_softmax_over_queries_max_over_names_and_threshold() -> None:
    q = Queries.from_classnames(["background", "cat, kitty", "dog"])
    assert q.names == ["background", "cat", "kitty", "dog"]
    assert q.query_class.tolist() == [0, 1, 1, 2]
    logits = torch.tensor([[0.1, 0.1], [0.3, 0.2], [0.5, 0.1], [0.1, 0.19]]).view(4, 1, 2)
    s = SegSettings(logit_scale=10.0, prob_thd=0.4)
    labels, probs = clip_labels(logits, q, s, background=0)
    p = torch.softmax(10.0 * logits, dim=0)  # over the 4 queries
    want = torch.stack([p[0], torch.maximum(p[1], p[2]), p[3]])
    torch.testing.assert_close(probs, want)
    assert probs[:, 0, 1].argmax() == 1 and probs[:, 0, 1].max() < 0.4
    assert labels.tolist() == [[1, 0]]  # pixel 2: cat wins with prob < 0.4 -> background
    assert torch.equal(class_max(p, q.query_class, 3), want)


def test_sclip_area_threshold_drops_small_classes() -> None:
    q = Queries.from_classnames(["background", "a", "b"])
    logits = torch.zeros(3, 1, 10)
    logits[1, 0, :9] = 1.0  # class a wins 9 pixels
    logits[2, 0, 9] = 1.0  # class b wins 1 pixel: 1 / 10 of the foreground <= 0.1 -> dropped
    labels, _ = clip_labels(logits, q, SegSettings(logit_scale=10.0, area_thd=0.1), 0)
    assert labels[0, 9] != 2 and (labels[0, :9] == 1).all()


def test_resize_rules() -> None:
    assert mmseg_size(375, 500, 448, 2048) == (448, 597)
    assert mmseg_size(1024, 2048, 448, 2048) == (448, 896)
    assert mmseg_size(100, 5000, 448, 2048) == (41, 2048)  # the long side caps it
    assert patch_rounded_size(375, 500, 336, 16) == (336, 448)


# ---------------------------------------------------------------- settings files
@pytest.mark.parametrize("dataset", [d for d in DATASETS if d != "generic"])
def test_each_benchmark_has_a_settings_file_for_every_head(dataset) -> None:
    path = REPO / "configs" / "dense" / f"{dataset}.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["dataset"] == dataset
    for head in HEADS:
        s = load_settings(path, head)
        assert s.head == head and s.logit_scale > 0


def test_paper_values_are_carried() -> None:
    dense = REPO / "configs" / "dense"
    clear = load_settings(dense / "voc21.yaml", "clearclip")
    assert (clear.short_side, clear.slide_crop, clear.slide_stride) == (448, 448, 224)
    assert (clear.logit_scale, clear.prob_thd, clear.templates) == (50, 0.5, "openai")
    sclip = load_settings(dense / "voc21.yaml", "sclip")
    assert (sclip.short_side, sclip.slide_crop, sclip.logit_scale, sclip.area_thd) == (
        336, 224, 65, 0.1
    )  # fmt: skip
    cliper = load_settings(dense / "cityscapes.yaml", "cliper")
    assert (cliper.short_side, cliper.attention_thr, cliper.slide_crop) == (560, 0.35, 0)
    assert load_settings(dense / "cityscapes.yaml", "clearclip").slide_crop == 224


def test_bad_settings_are_refused(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("settings:\n  slide_crp: 3\n")
    with pytest.raises(ValueError, match="unknown key 'slide_crp'"):
        load_settings(bad, "clearclip")
    bad.write_text("settings:\n  fuse_layers: 3\n")
    with pytest.raises(ValueError, match="fuse_layers must be true or false"):
        load_settings(bad, "cliper")
    with pytest.raises(ValueError, match="slide_crop must be an integer"):
        load_settings(None, "clearclip", {"slide_crop": 3.5})
    with pytest.raises(ValueError, match="logit_scale must be a number"):
        load_settings(None, "clearclip", {"logit_scale": "big"})
    with pytest.raises(ValueError, match="refine needs"):
        load_settings(None, "clearclip", {"refine": "sfsa"})
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "none.yaml", "clearclip")


# ---------------------------------------------------------------- readers on tiny trees
def _save_label(path: Path, label: np.ndarray, mode: str = "L") -> None:
    """A class-index PNG: grey (``L``) or with a palette (``P``, as VOC's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = label.astype(np.uint8)
    img = Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.tobytes())
    if mode == "P":
        img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    img.save(path)


def _save_image(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _label(n_classes: int, seed: int, h: int = 12, w: int = 16) -> np.ndarray:
    """A label map using 0, the top class and 255 (a border)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, n_classes, (h, w))
    label[0, 0], label[0, 1] = 0, n_classes - 1
    label[-1, :] = 255
    return label


def make_tree(dataset: str, root: Path, n: int = 2, h: int = 12, w: int = 16) -> list[np.ndarray]:
    """A tiny tree of ``dataset``'s layout under ``root``; returns the raw label maps."""
    raw_classes = {"voc20": 21, "context59": 60, "ade20k": 151}
    n_classes = raw_classes.get(dataset, len(SETS[dataset].classnames) if dataset in SETS else 3)
    labels = [_label(n_classes, i, h, w) for i in range(n)]
    names = [f"img{i:03d}" for i in range(n)]
    voc_files = ("SegmentationClass", "Segmentation")
    context_files = ("SegmentationClassContext", "SegmentationContext")
    voc = {"voc21": voc_files, "voc20": voc_files, "context60": context_files,
           "context59": context_files}  # fmt: skip
    for i, (name, label) in enumerate(zip(names, labels, strict=True)):
        if dataset in voc:
            seg, split = voc[dataset]
            _save_image(root / "JPEGImages" / f"{name}.jpg", h, w, i)
            _save_label(root / seg / f"{name}.png", label, "P")
        elif dataset in ("coco_stuff", "coco_object"):
            suffix = "_labelTrainIds" if dataset == "coco_stuff" else "_instanceTrainIds"
            _save_image(root / "images/val2017" / f"{name}.jpg", h, w, i)
            _save_label(root / "annotations/val2017" / f"{name}{suffix}.png", label)
        elif dataset == "ade20k":
            _save_image(root / "images/validation" / f"{name}.jpg", h, w, i)
            _save_label(root / "annotations/validation" / f"{name}.png", label)
        elif dataset == "cityscapes":
            city = "frankfurt" if i % 2 else "lindau"
            _save_image(root / "leftImg8bit/val" / city / f"{name}_leftImg8bit.png", h, w, i)
            _save_label(root / "gtFine/val" / city / f"{name}_gtFine_labelTrainIds.png", label)
        else:  # generic
            _save_image(root / "images" / f"{name}.png", h, w, i)
            _save_label(root / "masks" / f"{name}.png", label)
    if dataset in voc:
        split_file = root / "ImageSets" / voc[dataset][1] / "val.txt"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text("\n".join(names) + "\n")
    if dataset == "generic":
        (root / "classnames.txt").write_text("background\ncat, kitty\ndog\n")
    return labels


@pytest.mark.parametrize("dataset", DATASETS)
def test_reader_on_a_tiny_tree(tmp_path, dataset) -> None:
    raw = make_tree(dataset, tmp_path)
    data = SegmentationSet(dataset, tmp_path)
    assert len(data) == 2
    expected_classes = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59,
                        "coco_stuff": 171, "coco_object": 81, "ade20k": 150, "cityscapes": 19,
                        "generic": 3}  # fmt: skip
    assert data.num_classes == expected_classes[dataset]
    assert data.background == (0 if dataset in ("voc21", "context60", "coco_object", "generic")
                                else None)  # fmt: skip
    reduced = dataset in ("voc20", "context59", "ade20k")
    for i in range(2):
        image, label, name = data[i]
        raw_i = raw[int(name[-1])]  # (cityscapes lists by city: frankfurt/img001 first)
        assert image.mode == "RGB" and label.shape == (12, 16) and label.dtype == np.int64
        np.testing.assert_array_equal(label, reduce_zero_label(raw_i) if reduced else raw_i)
        ignored = (raw_i == 255).sum() + ((raw_i == 0).sum() if reduced else 0)
        assert (label == 255).sum() == ignored > 0
        assert label[label != 255].max() < data.num_classes


def test_generic_reduce_zero_label_drops_the_background_class(tmp_path) -> None:
    raw = make_tree("generic", tmp_path)
    data = SegmentationSet("generic", tmp_path, reduce_zero_label=True)
    assert list(data.classnames) == ["cat, kitty", "dog"] and data.background is None
    _, label, name = data[0]
    np.testing.assert_array_equal(label, reduce_zero_label(raw[int(name[-1])]))
    with pytest.raises(ValueError, match="generic layout only"):
        SegmentationSet("ade20k", tmp_path, reduce_zero_label=True)


def test_reader_refusals(tmp_path) -> None:
    make_tree("ade20k", tmp_path / "ade")
    (tmp_path / "ade/annotations/validation/img001.png").unlink()
    with pytest.raises(FileNotFoundError, match="img001.png"):
        SegmentationSet("ade20k", tmp_path / "ade")
    make_tree("generic", tmp_path / "gen")
    Image.new("RGB", (16, 12)).save(tmp_path / "gen/masks/img000.png")
    with pytest.raises(ValueError, match="RGB image"):
        SegmentationSet("generic", tmp_path / "gen")[0]
    _save_label(tmp_path / "gen/masks/img001.png", np.full((12, 16), 7))
    with pytest.raises(ValueError, match="label 7, outside the 3 classes"):
        SegmentationSet("generic", tmp_path / "gen")[1]
    with pytest.raises(FileNotFoundError, match="split file"):
        SegmentationSet("voc21", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        SegmentationSet("voc", tmp_path)


def test_class_lists_are_the_official_lengths() -> None:
    assert len(segclasses.ADE20K) == 150 and len(segclasses.COCO_STUFF) == 171
    assert segclasses.VOC21[0] == "background" and segclasses.VOC21[4] == "ship"
    assert segclasses.SCLIP_VOC21[15].startswith("person, person in shirt")


def test_shipped_lists_are_documented_and_are_the_sets_defaults() -> None:
    folder = Path(segclasses.__file__).parent / "classnames"
    readme = (folder / "README.md").read_text()
    shipped = sorted(p.name for p in folder.glob("*.txt"))
    assert len(shipped) == 8 + 3 + 6 + 1  # ClearCLIP's, SCLIP's that differ, CLIPer's, prompts
    for name in shipped:
        assert f"`{name}`" in readme, name
    for dataset, spec in SETS.items():
        assert spec.classnames == segclasses.read_list(f"{dataset}.clearclip")


# entries of CLIPer's lists that differ from ClearCLIP's (the counts issue 23 gives; Context's
# "wood " differs only by a trailing space, which both readers strip)
CLIPER_DIFFERS = {"voc21": 6, "voc20": 6, "context60": 4, "context59": 4, "coco_object": 8,
                  "coco_stuff": 0, "ade20k": 1, "cityscapes": 2}  # fmt: skip


@pytest.mark.parametrize("dataset", list(CLIPER_DIFFERS))
def test_cliper_head_reads_clipers_own_class_names(dataset) -> None:
    spec = SETS[dataset]
    s = load_settings(REPO / "configs" / "dense" / f"{dataset}.yaml", "cliper")
    entries = resolve_classnames(s.classnames, dataset, spec.classnames, spec.background)
    assert len(entries) == len(spec.classnames)
    fg = [i for i in range(len(entries)) if i != spec.background]
    assert all(isinstance(entries[i], tuple) and len(entries[i]) == 1 for i in fg)
    assert sum(entries[i][0] != spec.classnames[i] for i in fg) == CLIPER_DIFFERS[dataset]
    for head in ("vanilla", "maskclip", "clearclip"):  # the other heads keep ClearCLIP's list
        other = load_settings(REPO / "configs" / "dense" / f"{dataset}.yaml", head).classnames
        assert resolve_classnames(other, dataset, spec.classnames) == spec.classnames


def test_cliper_entries_are_one_query_each_and_the_background_its_words() -> None:
    entries = resolve_classnames("cliper", "voc21", SETS["voc21"].classnames, background=0)
    assert entries[3] == ("bird avian",) and entries[20] == ("tvmonitor screen",)
    # one prompt, commas included (cliper.code embeds each line of cls_voc21.txt as it is)
    assert entries[15] == ("person with clothes, people, human",)
    # its first line, split at spaces and commas
    assert entries[0] == segclasses.CLIPER_VOC_BACKGROUND
    assert entries[0][:3] == ("ground", "land", "grass") and len(entries[0]) == 25
    queries = Queries.from_classnames(entries)
    assert queries.names.count("person with clothes, people, human") == 1
    assert len(queries.names) == 25 + 20 and queries.query_class[-1] == 20
    no_bg = resolve_classnames("cliper", "voc20", SETS["voc20"].classnames, background=None)
    assert no_bg == entries[1:]
    ade = resolve_classnames("cliper", "ade20k", SETS["ade20k"].classnames)
    assert ade[12] == ("person with cloth people human",)
    assert resolve_classnames("cliper", "generic", ("a", "b")) == ("a", "b")  # none: the set's


def test_synthetic_segmentation_set(tmp_path) -> None:
    root = write_segmentation_set(tmp_path / "seg", 5, image_size=48, seed=0)
    data = SegmentationSet("generic", root)
    assert len(data) == 5 and data.num_classes == 1 + len(COLOURS) and data.background == 0
    assert list(data.classnames) == seg_classnames() and data.templates
    seen = set()
    colours = list(COLOURS.values())
    for i in range(5):
        image, label, _ = data[i]
        seen |= set(np.unique(label).tolist())
        pixels = np.asarray(image).astype(int)
        for c in np.unique(label[label > 0]):  # object pixels carry their class's colour
            median = np.median(pixels[label == c], axis=0)  # (JPEG blurs the edges)
            assert np.abs(np.array(colours) - median).sum(1).argmin() == c - 1
    assert 0 in seen and len(seen) > 2
    again = write_segmentation_set(tmp_path / "seg2", 5, image_size=48, seed=0)
    assert (again / "masks/s0000003.png").read_bytes() == (root / "masks/s0000003.png").read_bytes()


def test_synthetic_cli_seg_only_leaves_other_parts_alone(tmp_path) -> None:
    from aclip.data.synthetic.__main__ import main

    main(["--out", str(tmp_path), "--n-eval-seg", "3", "--seg-only", "--image-size", "32"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_seg"]
    assert len(list((tmp_path / "eval_seg/images").iterdir())) == 3


# ---------------------------------------------------------------- command line, end to end
SMALL_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}


def open_clip_folder(tmp: Path, cfg: dict = SMALL_OPEN_CLIP) -> Path:
    """An open_clip local-dir folder of a randomly initialised model built by open_clip."""
    from safetensors.torch import save_file

    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(0)
    with quiet_logs():
        model = open_clip.create_model(f"local-dir:{tmp}")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp / "open_clip_model.safetensors"))
    return tmp


def aclip_run(tmp: Path) -> Path:
    """A run directory with a checkpoint as the trainer writes it (model states + config)."""
    cfg = load_config(None, [
        "model.vision_model=vit_tiny_patch16_224", "model.image_size=32",
        "model.vision_kwargs={patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}",
        "model.embed_dim=32", "model.context_length=16", "model.text_width=32",
        "model.text_layers=1", "model.text_heads=2", "loss.w_simclr=0", "loss.w_byol=0",
    ])  # fmt: skip
    model = build_model(cfg.model, cfg.loss)
    tag = tmp / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    from omegaconf import OmegaConf

    states = {"module": model.state_dict(), "config": OmegaConf.to_yaml(OmegaConf.structured(cfg))}
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    (tmp / "checkpoints" / "latest").write_text("step_00000001")
    return tmp


FAST = ["--set", "short_side=48", "--set", "slide_crop=32", "--set", "slide_stride=16"]


def test_cli_every_head_on_an_open_clip_folder(tmp_path, capsys) -> None:
    folder = open_clip_folder(tmp_path / "oc")
    root = write_segmentation_set(tmp_path / "seg", 3, image_size=48)
    out, vis = tmp_path / "r.json", tmp_path / "vis.png"
    rc = cli.main(["--checkpoint", str(folder), "--dataset", "generic", "--root", str(root),
                   "--settings", str(REPO / "configs/dense/synthetic.yaml"), "--head", "all",
                   "--json", str(out), "--vis", str(vis), "--no-progress", "--device", "cpu"]
                  + FAST)  # fmt: skip
    assert rc == 0
    results = json.loads(out.read_text())
    assert list(results) == list(HEADS)
    for m in results.values():
        assert m["n"] == 3 and 0 <= m["mIoU"] <= 1 and 0 <= m["aAcc"] <= 1
        assert m["settings"]["short_side"] == 48 and m["settings"]["templates"] == "dataset"
    assert results["cliper"]["settings"]["logit_scale"] == 100  # its heads: section
    assert vis.is_file() and Image.open(vis).width > 100
    printed = capsys.readouterr().out
    assert "| clearclip |" in printed
    rc = cli.main(["--checkpoint", str(folder), "--dataset", "generic", "--root", str(root),
                   "--settings", str(REPO / "configs/dense/synthetic_nobg.yaml"),
                   "--reduce-zero-label", "--head", "maskclip", "--json", str(out),
                   "--no-progress"] + FAST)  # fmt: skip
    assert rc == 0 and len(json.loads(out.read_text())["maskclip"]["IoU"]) == len(COLOURS)


def test_cli_reads_an_aclip_run(tmp_path) -> None:
    run = aclip_run(tmp_path / "run")
    assert cli.is_aclip_run(run) and not cli.is_aclip_run(open_clip_folder(tmp_path / "oc"))
    root = write_segmentation_set(tmp_path / "seg", 2, image_size=48)
    results = cli.segmentation(str(run), "generic", str(root), "clearclip,cliper",
                               str(REPO / "configs/dense/synthetic.yaml"),
                               {"short_side": 48, "slide_crop": 32, "slide_stride": 16},
                               progress=False)  # fmt: skip
    assert set(results) == {"clearclip", "cliper"} and results["clearclip"]["n"] == 2


def test_cli_errors(tmp_path, capsys) -> None:
    folder = open_clip_folder(tmp_path / "oc")
    rc = cli.main(["--checkpoint", str(folder), "--dataset", "ade20k", "--root",
                   str(tmp_path / "nowhere")])  # fmt: skip
    assert rc == 2 and "error:" in capsys.readouterr().err
    root = write_segmentation_set(tmp_path / "seg", 1, image_size=32)
    rc = cli.main(["--checkpoint", str(tmp_path / "missing"), "--dataset", "generic",
                   "--root", str(root)])  # fmt: skip
    assert rc == 2 and "no checkpoint at" in capsys.readouterr().err
    rc = cli.main(["--checkpoint", str(folder), "--dataset", "generic", "--root", str(root),
                   "--head", "gem"])  # fmt: skip
    assert rc == 2 and "--head" in capsys.readouterr().err
    rc = cli.main(["--checkpoint", str(folder), "--dataset", "generic", "--root", str(root),
                   "--set", "slide_crp=3"])  # fmt: skip
    assert rc == 2 and "unknown key 'slide_crp'" in capsys.readouterr().err


# ---------------------------------------------------------------- every layout; ViT-B/16 (slow)
@pytest.mark.parametrize("dataset", DATASETS)
def test_ten_image_run_of_each_layout(tmp_path, dataset) -> None:
    make_tree(dataset, tmp_path / "set", n=10, h=40, w=56)
    folder = open_clip_folder(tmp_path / "oc")
    fast = {"short_side": 48, "slide_crop": 32, "slide_stride": 16, "templates": "simple"}
    results = cli.segmentation(str(folder), dataset, str(tmp_path / "set"), "all", None, fast,
                               progress=False)  # fmt: skip
    num_classes = SegmentationSet(dataset, tmp_path / "set").num_classes
    for head, m in results.items():
        assert m["n"] == 10, head
        assert 0 <= m["mIoU"] <= 1 and len(m["IoU"]) == num_classes


@pytest.mark.slow
def test_open_clip_vit_b16_every_head_at_448_with_sliding_windows(tmp_path) -> None:
    """Randomly initialised open_clip ViT-B-16, imported through aclip.interop; every head on a
    375 x 500 image at short side 448 (448 x 597: two 448 windows, stride 224)."""
    from aclip.dense.segment import Segmenter
    from aclip.interop import load_clip
    from aclip.tokenizer import Tokenizer

    torch.manual_seed(0)
    with quiet_logs():
        ref = open_clip.create_model("ViT-B-16")
    torch.save(ref.state_dict(), tmp_path / "b16.pt")
    clip, cfg, pre = load_clip(tmp_path / "b16.pt", "ViT-B-16")
    pixels = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    names = ["background", "cat, kitty", "dog"]
    for head in HEADS:
        s = load_settings(REPO / "configs/dense/voc21.yaml", head,
                          {"short_side": 448, "slide_crop": 448, "slide_stride": 224})  # fmt: skip
        seg = Segmenter(clip, Tokenizer(cfg.context_length), names, s, ["a photo of a {}."], 0,
                        pre.mean, pre.std)  # fmt: skip
        labels, scores = seg.predict(image)
        assert labels.shape == (375, 500) and torch.isfinite(scores).all(), head
        assert set(labels.unique().tolist()) <= {0, 1, 2, 255}
