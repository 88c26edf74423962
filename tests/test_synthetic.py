"""Tests for aclip.data.synthetic: layouts, determinism, captions naming the drawn objects."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from aclip.data.synthetic import COLOURS, SHAPES, make_sample, scenes, write_synthetic
from aclip.data.synthetic.__main__ import main


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, n_train=25, n_eval_cls=12, n_eval_ret=7, image_size=64,
                    samples_per_shard=10, seed=3)  # fmt: skip
    return out


def test_train_layout_img2dataset(synth):
    train = synth / "train"
    assert sorted(p.name for p in train.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert json.loads((train / "sizes.json").read_text()) == {
        "00000.tar": 10,
        "00001.tar": 10,
        "00002.tar": 5,
    }
    stats = json.loads((train / "00002_stats.json").read_text())
    assert stats["count"] == 5 and stats["successes"] == 5 and stats["failed_to_download"] == 0
    mem = _members(train / "00001.tar")
    assert len(mem) == 30
    key = "000010000"
    assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= set(mem)
    meta = json.loads(mem[f"{key}.json"])
    assert meta["key"] == key and meta["status"] == "success"
    assert meta["caption"] == mem[f"{key}.txt"].decode()
    img = Image.open(io.BytesIO(mem[f"{key}.jpg"]))
    assert img.format == "JPEG" and img.size == (64, 64) == (meta["width"], meta["height"])


def test_eval_layout_clip_benchmark(synth):
    cls = synth / "eval_cls"
    assert (cls / "classnames.txt").read_text().splitlines() == list(SHAPES)
    templates = (cls / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert len(templates) >= 3 and all("{c}" in t for t in templates)
    assert (cls / "test" / "nshards.txt").read_text().strip() == "2"
    labels = []
    for k in range(2):
        mem = _members(cls / "test" / f"{k}.tar")
        labels += [int(v) for n, v in mem.items() if n.endswith(".cls")]
        assert sum(n.endswith(".jpg") for n in mem) == sum(n.endswith(".cls") for n in mem)
    assert len(labels) == 12 and all(0 <= x < len(SHAPES) for x in labels)
    ret = synth / "eval_ret"
    assert (ret / "dataset_type.txt").read_text().strip() == "retrieval"
    mem = _members(ret / "test" / "0.tar")
    caps = [v.decode().split("\n") for n, v in mem.items() if n.endswith(".txt")]
    assert len(caps) == 7 and all(len(c) == 5 and len(set(c)) == 5 for c in caps)


def test_colour_set_labels_the_same_images_by_colour(synth):
    colour, shape = synth / "eval_colour", synth / "eval_cls"
    assert (colour / "classnames.txt").read_text().splitlines() == list(COLOURS)
    mem_c, mem_s = _members(colour / "test" / "0.tar"), _members(shape / "test" / "0.tar")
    jpgs = sorted(n for n in mem_c if n.endswith(".jpg"))
    assert jpgs and all(mem_c[n] == mem_s[n] for n in jpgs)
    for i, name in enumerate(jpgs):
        objects = make_sample(3, "eval_cls", i, 64)["objects"]
        assert int(mem_c[name.replace(".jpg", ".cls")]) == list(COLOURS).index(objects[0][1])


def test_deterministic_bytes(tmp_path):
    kw = dict(n_train=6, n_eval_cls=3, n_eval_ret=3, image_size=48, samples_per_shard=4)
    write_synthetic(tmp_path / "a", seed=7, **kw)
    write_synthetic(tmp_path / "b", seed=7, workers=2, **kw)
    write_synthetic(tmp_path / "c", seed=8, **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def _colour_fraction(jpg: bytes, rgb) -> float:
    arr = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).astype(int)
    return float((np.abs(arr - np.array(rgb)).max(-1) < 45).mean())


@pytest.mark.parametrize("index", range(12))
def test_caption_names_drawn_objects(index):
    s = make_sample(0, "train", index, 96)
    assert 1 <= len(s["objects"]) <= 2
    for shape, colour in s["objects"]:
        assert f"{colour} {shape}" in s["caption"]
        # The saturated object colour covers roughly pi * (0.075..0.15)^2 of the image or less.
        assert 0.003 < _colour_fraction(s["jpg"], COLOURS[colour]) < 0.2


def test_cls_sample_single_object_and_background_is_muted():
    s = make_sample(1, "eval_cls", 0, 96)
    assert len(s["objects"]) == 1
    shape, colour = s["objects"][0]
    # Background never holds saturated colours: outside the object colour, few saturated pixels.
    arr = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).astype(int)
    sat = arr.max(-1) - arr.min(-1)
    assert (sat > 120).mean() < 0.2


def test_shapes_are_distinct_outlines():
    areas = {}
    for shape in SHAPES:
        pts = scenes._unit_outline(shape)
        x, y = pts[:, 0], pts[:, 1]
        areas[shape] = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
        assert np.abs(pts).max() <= 1.0 + 1e-6
    np.testing.assert_allclose(areas["square"], 2.0, rtol=1e-6)  # inscribed in the unit circle
    np.testing.assert_allclose(areas["hexagon"], 1.5 * np.sqrt(3), rtol=1e-6)
    assert areas["star"] < areas["hexagon"] and areas["diamond"] < areas["square"]


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path), "--n-train", "3", "--n-eval-cls", "2",
                    "--n-eval-ret", "2", "--image-size", "32", "--workers", "1"])  # fmt: skip
    assert (tmp_path / "train" / "00000.tar").exists()
    assert "wrote" in capsys.readouterr().out


def test_object_radius_option(tmp_path) -> None:
    """--object-radius sets the objects' radius range (fractions of the side); the default
    leaves the demo's bytes as they were; a range outside (0, 0.5] is refused."""
    import numpy as np

    from aclip.data.synthetic.scenes import _place

    placed = _place(np.random.default_rng(0), 100, 3, (0.2, 0.25))
    assert all(20 <= r <= 25 for _, _, r in placed)
    kw = dict(n_train=4, n_eval_cls=0, n_eval_ret=0, image_size=32, samples_per_shard=4)
    write_synthetic(tmp_path / "d", **kw)
    write_synthetic(tmp_path / "e", **kw, object_radius=(0.10, 0.18))
    write_synthetic(tmp_path / "f", **kw, object_radius=(0.2, 0.3))
    tar = "train/00000.tar"
    assert (tmp_path / "d" / tar).read_bytes() == (tmp_path / "e" / tar).read_bytes()
    assert (tmp_path / "d" / tar).read_bytes() != (tmp_path / "f" / tar).read_bytes()
    with pytest.raises(ValueError, match="object_radius"):
        write_synthetic(tmp_path / "g", **kw, object_radius=(0.3, 0.2))
