"""Tests for aclip.data.evalsets against the synthetic CLIP_benchmark-style sets."""

import io
import tarfile

import pytest
import torch
from PIL import Image

from aclip.data.evalsets import (
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
