"""Tests for aclip.data.sets.wds against the synthetic CLIP_benchmark-style sets."""

import io
import tarfile

import pytest
import torch
from PIL import Image

from aclip.data.sets.wds import (
    check_eval_set,
    load_wds_classification,
    load_wds_retrieval,
    retrieval_collate,
    shard_paths,
)
from aclip.data.synthetic import SHAPES, make_sample, write_synthetic
from aclip.data.views import eval_transform

N_CLS, N_RET, SEED, SIZE = 13, 9, 4, 40


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsets")
    write_synthetic(root, n_train=0, n_eval_cls=N_CLS, n_eval_ret=N_RET, image_size=SIZE,
                    samples_per_shard=5, seed=SEED)  # fmt: skip
    return root


def test_classification(sets):
    ds, classnames, templates = load_wds_classification(sets / "eval_cls", eval_transform(32))
    assert classnames == list(SHAPES)
    assert "a photo of a {c}." in templates
    items = list(ds)
    assert len(items) == N_CLS
    labels = [label for _, label in items]
    want = [
        SHAPES.index(make_sample(SEED, "eval_cls", i, SIZE)["objects"][0][0]) for i in range(N_CLS)
    ]
    assert labels == want
    img, _ = items[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32


def test_classification_image_matches_tar(sets):
    ds, _, _ = load_wds_classification(sets / "eval_cls", eval_transform(SIZE))
    img, _ = next(iter(ds))
    with tarfile.open(sets / "eval_cls" / "test" / "0.tar") as tar:
        raw = tar.extractfile("s0000000.jpg").read()
    ref = eval_transform(SIZE)(Image.open(io.BytesIO(raw)))
    torch.testing.assert_close(img, ref)


def test_retrieval_and_collate(sets):
    ds = load_wds_retrieval(sets / "eval_ret", eval_transform(32))
    items = list(ds)
    assert len(items) == N_RET
    assert all(len(caps) == 5 for _, caps in items)
    assert items[2][1] == make_sample(SEED, "eval_ret", 2, SIZE)["captions"]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=retrieval_collate)
    imgs, caps = next(iter(loader))
    assert imgs.shape == (4, 3, 32, 32) and len(caps) == 4 and len(caps[0]) == 5


def test_dataloader_workers_see_every_sample_once(sets):
    ds, _, _ = load_wds_classification(sets / "eval_cls", eval_transform(16))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    assert sum(len(labels) for _, labels in loader) == N_CLS


@pytest.mark.parametrize(
    "missing", ["classnames.txt", "zeroshot_classification_templates.txt", "test/nshards.txt"]
)
def test_missing_files_named(sets, tmp_path, missing):
    import shutil

    root = tmp_path / "cls"
    shutil.copytree(sets / "eval_cls", root)
    (root / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.split("/")[-1]):
        load_wds_classification(root, eval_transform(16))


def test_missing_shard_named(sets, tmp_path):
    import shutil

    root = tmp_path / "ret"
    shutil.copytree(sets / "eval_ret", root)
    assert len(shard_paths(root)) == 2
    (root / "test" / "1.tar").unlink()
    with pytest.raises(FileNotFoundError, match="1.tar"):
        load_wds_retrieval(root, eval_transform(16))


# --- kind and layout checks (issue 10): what the pre-flight and the eval CLIs refuse ----------


@pytest.fixture(scope="module")
def cb_sets(tmp_path_factory):
    """Sets written by CLIP_benchmark's own exporter (no dataset_type.txt for single-label)."""
    from cb_sets import write_clip_benchmark_sets

    return write_clip_benchmark_sets(tmp_path_factory.mktemp("clip_benchmark"))


@pytest.mark.parametrize(
    ("name", "task", "kind"),
    [
        ("eval_cls", "zeroshot", "classification"),
        ("eval_ret", "retrieval", "retrieval"),
        ("cb_classification", "zeroshot", "classification"),
        ("cb_multilabel", "zeroshot", "multilabel"),
        ("cb_retrieval", "retrieval", "retrieval"),
    ],
)
def test_check_eval_set_tells_the_kind(sets, cb_sets, name, task, kind):
    root = cb_sets[name] if name.startswith("cb_") else sets / name
    assert check_eval_set(root, task) == kind


@pytest.mark.parametrize(
    ("name", "task", "why", "expected"),
    [
        ("eval_cls", "retrieval", "dataset_type.txt says classification", "a retrieval set"),
        ("eval_ret", "zeroshot", "dataset_type.txt says retrieval", "zero-shot classification"),
        ("cb_classification", "retrieval", "0.tar carries .cls", "a retrieval set"),
        ("cb_multilabel", "retrieval", "dataset_type.txt says multilabel", "a retrieval set"),
    ],
)
def test_wrong_kind_is_named(sets, cb_sets, name, task, why, expected):
    root = cb_sets[name] if name.startswith("cb_") else sets / name
    with pytest.raises(ValueError, match="expected") as err:
        check_eval_set(root, task)
    message = str(err.value)
    assert str(root) in message and why in message and expected in message
    loader = load_wds_retrieval if task == "retrieval" else load_wds_classification
    with pytest.raises(ValueError, match=expected):
        loader(root, eval_transform(16))  # the loaders check too


def _rewrite_first_shard(root, edit):
    """Rewrite root/test/0.tar with ``edit(name, data) -> (name, data) | None`` per member."""
    shard = root / "test" / "0.tar"
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            edited = edit(name, data)
            if edited is not None:
                info = tarfile.TarInfo(edited[0])
                info.size = len(edited[1])
                tar.addfile(info, io.BytesIO(edited[1]))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_label", "has no .cls member"),
        ("no_image", "has no image"),
        ("label_out_of_range", "is not a class index below 3"),
        ("no_label_member_at_all", "cannot tell|no .cls, .npy or .txt"),
        ("not_a_tar", "cannot read evaluation shard"),
        ("empty_classnames", "classnames.txt is empty"),
    ],
)
def test_bad_layout_is_named(cb_sets, tmp_path, case, message):
    import shutil

    root = tmp_path / "set"
    shutil.copytree(cb_sets["cb_classification"], root)
    first = "s0000000."
    edits = {
        "no_label": lambda n, d: None if n == first + "cls" else (n, d),
        "no_image": lambda n, d: None if n == first + "webp" else (n, d),
        "label_out_of_range": lambda n, d: (n, b"3") if n == first + "cls" else (n, d),
        "no_label_member_at_all": lambda n, d: None if n.endswith(".cls") else (n, d),
    }
    if case in edits:
        _rewrite_first_shard(root, edits[case])
    elif case == "not_a_tar":
        (root / "test" / "0.tar").write_bytes(b"this is not a tar file")
    else:
        (root / "classnames.txt").write_text("\n")
    if case == "no_label":  # with dataset_type.txt the kind is known: the member is missing
        (root / "dataset_type.txt").write_text("classification\n")
    with pytest.raises(ValueError, match=message) as err:
        check_eval_set(root, "zeroshot")
    assert str(root) in str(err.value)


def test_sample_without_label_later_in_the_set_is_named(cb_sets, tmp_path):
    import shutil

    root = tmp_path / "set"
    shutil.copytree(cb_sets["cb_classification"], root)
    _rewrite_first_shard(root, lambda n, d: None if n == "s0000005.cls" else (n, d))
    check_eval_set(root, "zeroshot")  # the first sample is fine
    ds, _, _ = load_wds_classification(root, eval_transform(16))
    with pytest.raises(ValueError, match=r"sample s0000005 in .*0\.tar has no \.cls label"):
        list(ds)


def test_multilabel_set_reads_clip_benchmark_vectors(cb_sets):
    from cb_sets import N_SAMPLES, multilabel_target

    ds, classnames, templates = load_wds_classification(
        cb_sets["cb_multilabel"], eval_transform(16)
    )
    assert classnames == ["cat", "dog", "car"] and templates == ["a photo of a {c}.", "a {c}."]
    labels = [label for _, label in ds]
    assert torch.stack(labels).tolist() == [multilabel_target(i) for i in range(N_SAMPLES)]
