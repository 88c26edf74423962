"""Retrieval recall against CLIP_benchmark, the Karpathy reader, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config
from PIL import Image
from torch.utils.data import DataLoader

from aclip.config import to_yaml
from aclip.data.sets.karpathy import load_karpathy
from aclip.data.sets.wds import load_wds_retrieval, retrieval_collate
from aclip.data.synthetic import write_synthetic
from aclip.data.views import eval_transform
from aclip.eval.retrieval import encode_retrieval_set, evaluate_retrieval, retrieval_metrics
from aclip.model import build_model
from aclip.tokenizer import Tokenizer
from evals.retrieval import main as retrieval_main

N_RET = 12


def clip_benchmark_metrics(image_emb, text_emb, text_to_image, ks):
    """The last lines of CLIP_benchmark's ``zeroshot_retrieval.evaluate``, on given embeddings."""
    from clip_benchmark.metrics import zeroshot_retrieval as zr  # installed by `make install`

    scores = text_emb @ image_emb.t()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_to_image] = True
    out = {}
    for k in ks:
        t2i = zr.batchify(zr.recall_at_k, scores, positive, 16, "cpu", k=k)
        i2t = zr.batchify(zr.recall_at_k, scores.T, positive.T, 16, "cpu", k=k)
        out[f"image_retrieval_recall@{k}"] = (t2i > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (i2t > 0).float().mean().item()
    return out


@pytest.mark.parametrize("captions_per_image", [[5] * 60, [5] * 20 + [3, 7, 0, 1] * 5])
def test_metrics_match_clip_benchmark_on_random_embeddings(captions_per_image):
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor(captions_per_image)
    text_to_image = torch.repeat_interleave(torch.arange(len(counts)), counts)
    image_emb = F.normalize(torch.randn(len(counts), 8, generator=gen), dim=-1)
    noise = torch.randn(len(text_to_image), 8, generator=gen)
    text_emb = F.normalize(image_emb[text_to_image] + 1.5 * noise, dim=-1)
    ks = (1, 5, 10)
    ours = retrieval_metrics(image_emb, text_emb, text_to_image, ks, chunk_size=7)
    want = clip_benchmark_metrics(image_emb, text_emb, text_to_image, ks)
    assert ours == pytest.approx(want, abs=0)
    assert 0 < ours["image_retrieval_recall@1"] < ours["image_retrieval_recall@10"] < 1


def hand_made():
    """3 images, 2 captions each; caption j's row of scores against images is given directly
    (image embeddings are the identity, so scores = text embeddings)."""
    scores_TI = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # image 0: rank 1
            [0.1, 0.8, 0.3],  # image 0: rank 3
            [0.5, 0.4, 0.6],  # image 1: rank 3
            [0.2, 0.7, 0.1],  # image 1: rank 1
            [0.3, 0.2, 0.25],  # image 2: rank 2
            [0.05, 0.6, 0.7],  # image 2: rank 1
        ]
    )
    # per image, best rank of its captions: image 0 -> 1, image 1 -> 2 (t1 first), image 2 -> 1
    return torch.eye(3), scores_TI, torch.tensor([0, 0, 1, 1, 2, 2])


def test_metrics_on_hand_made_ranks():
    image_emb, text_emb, text_to_image = hand_made()
    ours = retrieval_metrics(image_emb, text_emb, text_to_image, ks=(1, 2, 3))
    want = {
        "image_retrieval_recall@1": 3 / 6,
        "image_retrieval_recall@2": 4 / 6,
        "image_retrieval_recall@3": 1.0,
        "text_retrieval_recall@1": 2 / 3,
        "text_retrieval_recall@2": 1.0,
        "text_retrieval_recall@3": 1.0,
    }
    assert ours == pytest.approx(want)
    assert ours == pytest.approx(
        clip_benchmark_metrics(image_emb, text_emb, text_to_image, (1, 2, 3))
    )


def test_k_above_candidates_is_capped():
    image_emb, text_emb, text_to_image = hand_made()
    ours = retrieval_metrics(image_emb, text_emb, text_to_image, ks=(1, 5))
    assert ours["image_retrieval_recall@5"] == 1.0 and ours["text_retrieval_recall@5"] == 1.0


def test_encode_records_caption_owners():
    class Fake(torch.nn.Module):
        def encode_image(self, images, keep_idx_BK=None, normalize=False):
            return F.normalize(images.flatten(1)[:, :4], dim=-1)

        def encode_text(self, tokens, normalize=False):
            return F.normalize(tokens[:, :4].float() + 1, dim=-1)

    batches = [
        (torch.randn(2, 3, 2, 2), [["a", "b"], ["c"]]),
        (torch.randn(3, 3, 2, 2), [["d", "e", "f"], [], ["g"]]),
    ]
    tok = lambda texts: torch.arange(len(texts) * 4).view(len(texts), 4)
    img, txt, owner = encode_retrieval_set(Fake(), tok, batches)
    assert img.shape == (5, 4) and txt.shape == (7, 4)
    assert owner.tolist() == [0, 0, 1, 2, 2, 2, 4]
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(5))


# --- Karpathy reader ------------------------------------------------------------------------


def _write_karpathy(root, with_filepath: bool, splits: dict[str, int], captions: int = 5):
    records, n = [], 0
    for split, count in splits.items():
        for _ in range(count):
            folder = "val2014" if with_filepath else ""
            name = f"img{n:03d}.jpg"
            (root / "images" / folder).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20 + n, 16), (n * 9 % 255, 80, 160)).save(
                root / "images" / folder / name
            )
            record = {
                "filename": name,
                "split": split,
                "sentences": [
                    {"raw": f" caption {c} of image {n}. ", "tokens": []} for c in range(captions)
                ],
            }
            if with_filepath:
                record["filepath"] = folder
            records.append(record)
            n += 1
    path = root / "dataset.json"
    path.write_text(json.dumps({"images": records, "dataset": "x"}))
    return path, root / "images"


@pytest.mark.parametrize("with_filepath", [False, True], ids=["flickr", "coco"])
def test_karpathy_splits_and_captions(tmp_path, with_filepath):
    counts = {"train": 3, "restval": 2, "val": 2, "test": 4}
    json_path, images = _write_karpathy(tmp_path, with_filepath, counts)
    for split, n in counts.items():
        assert len(load_karpathy(json_path, images, split)) == n
    ds = load_karpathy(json_path, images, "test", transform=eval_transform(16))
    img, caps = ds[1]
    assert img.shape == (3, 16, 16)
    assert caps == [f"caption {c} of image 8." for c in range(5)]
    assert all(len(c) == 5 for _, c in ds)
    loader = DataLoader(ds, batch_size=3, collate_fn=retrieval_collate)
    images_B, caps_B = next(iter(loader))
    assert images_B.shape == (3, 3, 16, 16) and len(caps_B) == 3


def test_karpathy_missing_files_are_named(tmp_path):
    json_path, images = _write_karpathy(tmp_path, True, {"test": 3})
    (images / "val2014" / "img001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 images missing.*val2014/img001\.jpg"):
        load_karpathy(json_path, images)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_karpathy(tmp_path / "nope.json", images)
    with pytest.raises(ValueError, match="no images in split 'val'"):
        load_karpathy(json_path, images, "val")


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ret_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("ret")
    write_synthetic(root, n_train=0, n_eval_cls=0, n_eval_ret=N_RET, image_size=48,
                    samples_per_shard=8)  # fmt: skip
    return root / "eval_ret"


def _check(metrics):
    assert metrics["n_images"] == N_RET and metrics["n_texts"] == 5 * N_RET
    for way in ("image", "text"):
        r = [metrics[f"{way}_retrieval_recall@{k}"] for k in (1, 5, 10)]
        assert all(0 <= x <= 1 for x in r)
        assert r[0] <= r[1] <= r[2]


def test_tiny_model_end_to_end(tmp_path, ret_set):
    torch.manual_seed(0)
    cfg = tiny_config(str(tmp_path))
    model = build_model(cfg.model, cfg.loss).clip.eval()
    dataset = load_wds_retrieval(ret_set, eval_transform(cfg.model.image_size))
    loader = DataLoader(dataset, batch_size=5, collate_fn=retrieval_collate)
    _check(evaluate_retrieval(model, Tokenizer(cfg.model.context_length), loader))


def _fake_checkpoint(out):
    cfg = tiny_config(str(out))
    model = build_model(cfg.model, cfg.loss)
    tag = out / "checkpoints" / "step1"
    tag.mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step1")
    torch.save(
        {"config": to_yaml(cfg), "module": model.state_dict()}, tag / "mp_rank_00_model_states.pt"
    )


def test_cli(tmp_path, ret_set, capsys):
    _fake_checkpoint(tmp_path)
    out = tmp_path / "m.json"
    argv = ["--checkpoint", str(tmp_path), "--data", str(ret_set), "--batch-size", "5"]
    assert retrieval_main([*argv, "--device", "cpu", "--json", str(out)]) == 0
    _check(json.loads(out.read_text()))
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    assert retrieval_main([*argv[:2], "--data", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    karpathy = ["--karpathy-json", str(tmp_path / "none.json"), "--images", str(tmp_path)]
    assert retrieval_main([*argv[:2], *karpathy]) == 2
    assert "none.json" in capsys.readouterr().err


def test_cli_no_progress_silences_the_bar(tmp_path, ret_set, capsys):
    _fake_checkpoint(tmp_path)
    argv = ["--checkpoint", str(tmp_path), "--data", str(ret_set), "--batch-size", "5"]
    assert retrieval_main([*argv, "--device", "cpu"]) == 0
    assert "retrieval" in capsys.readouterr().err  # the bar, by default
    assert retrieval_main([*argv, "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    _check(json.loads(captured.out))


def test_cli_refuses_a_classification_set_before_the_model(tmp_path, capsys, monkeypatch):
    import evals.retrieval as ret_cli

    _fake_checkpoint(tmp_path)
    write_synthetic(tmp_path / "sets", n_train=0, n_eval_cls=6, n_eval_ret=0, image_size=32,
                    samples_per_shard=8)  # fmt: skip
    monkeypatch.setattr(ret_cli, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    cls_set = tmp_path / "sets" / "eval_cls"
    assert retrieval_main(["--checkpoint", str(tmp_path), "--data", str(cls_set)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: evaluation set {cls_set} is a classification set")
    assert "expected a retrieval set (samples with .txt captions" in err


def test_cli_names_a_clip_benchmark_caption_list_given_as_karpathy_json(tmp_path, capsys):
    _fake_checkpoint(tmp_path)
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    listing = tmp_path / "flickr30k_test_karpathy.txt"  # CLIP_benchmark's annotation file
    listing.write_text("image,caption\n1000092795.jpg,Two young guys with shaggy hair .\n")
    argv = ["--checkpoint", str(tmp_path), "--karpathy-json", str(listing), "--images", str(images)]
    assert retrieval_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {listing} is not JSON")
    assert "CLIP_benchmark's image,caption list" in err
    assert 'expected Karpathy\'s JSON {"images": [{"filename"' in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"image": "a.jpg", "caption": ["x"]}]', "no 'images' list"),  # CLIP_benchmark's COCO
        ('{"images": [{"split": "test", "sentences": []}]}', "image record 0 has no 'filename'"),
    ],
)
def test_karpathy_json_of_another_layout_is_named(tmp_path, content, message):
    path = tmp_path / "other.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_karpathy(path, tmp_path)
    assert str(path) in str(err.value) and '{"images": [' in str(err.value)
