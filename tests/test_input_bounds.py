"""Untrusted data input is bounded: image decoders by extension, pixel guards on region masks
and evaluation images, tar members of bounded size (gzip named .tar), token-less captions."""

import gzip
import io
import logging
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image, ImageFile

from aclip.data import tars
from aclip.data.decode import decode_sample
from aclip.data.pipeline import build_train_loader
from aclip.data.regions import decode_region, sample_regions
from aclip.data.sets import wds as evalsets
from aclip.data.skips import BadSample, SkipCounter
from aclip.data.views import ACLIPViews
from aclip.tokenizer import Tokenizer

S = 32


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _loader(spec: str):
    return build_train_loader(spec, Tokenizer(24), ACLIPViews(S), 1, 0, resampled=False,
                              shuffle_buffer=1)  # fmt: skip


def _captions_and_skips(loader, caplog) -> tuple[list[str], list[str]]:
    """The captions of the batches and the skip lines logged as they are consumed."""
    tok, counter = Tokenizer(24), SkipCounter()
    with caplog.at_level(logging.WARNING, logger="aclip.data.skips"):
        captions = [tok.decode(counter.update(b) and b["tokens"][0]) for b in loader]
    return captions, [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]


def _huge_png(side: int = 13000) -> bytes:
    """A 1-bit grey PNG claiming side x side pixels: ~37 KB of zlib for 169 Mpx."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data)
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    rows = (b"\x00" + b"\xff" * ((side + 7) // 8)) * side  # filter byte + packed bits per row
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 9))
            + chunk(b"IEND", b""))  # fmt: skip


@pytest.fixture
def no_pixel_decode(monkeypatch):
    """Make any pixel decode fail loudly (and be recorded): a guard must act before it."""
    calls = []

    def load(self):
        calls.append(self.size)
        raise RuntimeError(f"pixels of a {self.size} image decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


def test_eps_bytes_named_jpg_never_reach_the_eps_plugin(monkeypatch):
    opened = []
    real_open = EpsImagePlugin.EpsImageFile._open
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open",
                        lambda self: opened.append(1) or real_open(self))  # fmt: skip
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: opened.append("gs"))
    eps = _encode(_picture(), "EPS")
    sample = {"__key__": "k", "__url__": "s.tar", "jpg": eps, "txt": b"a cat"}
    with pytest.raises(BadSample, match="jpg member is not a JPEG, PNG, WEBP image") as err:
        decode_sample(sample)
    assert err.value.reason == "corrupt_image"
    assert opened == []
    # a real JPEG still decodes, with the same pixels as Pillow's own decode
    jpg = _encode(_picture(), "JPEG")
    img, caption, _ = decode_sample({**sample, "jpg": jpg})
    assert caption == "a cat"
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")))


def test_png_named_jpg_decodes_as_the_png_it_is():
    """Accepted, as webdataset's Pillow decoding takes it: only JPEG, PNG and WebP decoders
    are reachable from an image member, whichever of the three its name says."""
    png = _encode(_picture(1), "PNG")
    img, _, _ = decode_sample({"__key__": "k", "jpg": png, "txt": b"a cat"})
    assert np.array_equal(np.asarray(img), np.asarray(_picture(1)))


def test_shard_with_bad_members_counts_them(tmp_path, caplog):
    """EPS named .jpg: corrupt_image; captions of no token (NULs, control characters, a bare
    &nbsp;): empty_caption; a PNG named .jpg and normal samples train."""
    jpg, png = _encode(_picture(), "JPEG"), _encode(_picture(1), "PNG")
    members = [
        ("a.jpg", jpg), ("a.txt", b"a photo of a cat"),
        ("b.jpg", _encode(_picture(), "EPS")), ("b.txt", b"an eps file"),
        ("c.jpg", jpg), ("c.txt", b"\x00\x00\x00"),
        ("d.jpg", jpg), ("d.txt", b"\x01\x02\x7f \x1b"),
        ("e.jpg", jpg), ("e.txt", b"&nbsp;"),
        ("f.jpg", png), ("f.txt", b"a png named jpg"),
    ]  # fmt: skip
    (tmp_path / "0.tar").write_bytes(_tar_bytes(members))
    loader = _loader(str(tmp_path / "0.tar"))
    captions, logged = _captions_and_skips(loader, caplog)
    assert captions == ["a photo of a cat", "a png named jpg"]
    counts = loader.skip_stats.counts
    assert counts["empty_caption"] == 3 and counts["corrupt_image"] == 1
    assert len(logged) == 4 and "sample c: caption" in logged[1] and "has no token" in logged[1]


def test_huge_png_mask_is_refused_from_its_header(no_pixel_decode):
    huge = _huge_png()
    assert len(huge) < 40_000
    sample = {"__key__": "k", "__url__": "s.tar", "mask.png": huge}
    (region,) = sample_regions(sample, "the region")
    with pytest.raises(BadSample, match="png mask is 13000x13000, image 48x40") as err:
        decode_region(region, (40, 48), sample)
    assert err.value.reason == "bad_mask"
    with pytest.raises(BadSample, match="larger than"):  # an image that claims that size too
        decode_region(region, (13000, 13000), sample)
    assert no_pixel_decode == []


def test_huge_evaluation_image_is_refused_before_decode(no_pixel_decode):
    sample = {"__key__": "k", "__url__": "0.tar", "png": _huge_png()}
    with pytest.raises(ValueError, match=r"too_large: sample k in 0.tar is 13000x13000"):
        evalsets._image(sample)
    eps = {"__key__": "k", "__url__": "0.tar", "jpg": _encode(_picture(), "EPS")}
    with pytest.raises(ValueError, match="not a JPEG, PNG, WEBP image"):
        evalsets._image(eps)
    assert no_pixel_decode == []


def test_normal_masks_and_eval_images_decode_as_before():
    mask = np.zeros((40, 48), np.uint8)
    mask[5:20, 10:30] = 255
    sample = {"__key__": "k", "mask.png": _encode(Image.fromarray(mask), "PNG")}
    (region,) = sample_regions(sample, "c")
    assert np.array_equal(decode_region(region, (40, 48), sample), mask)
    for fmt, ext in (("PNG", "png"), ("WEBP", "webp")):
        data = _encode(_picture(2), fmt) if fmt == "PNG" else _encode(_picture(2), "WEBP")
        got = evalsets._image({"__key__": "k", ext: data})
        want = Image.open(io.BytesIO(data)).convert("RGB")
        assert np.array_equal(np.asarray(got), np.asarray(want))


def _gzip_tar_with_a_big_member(path: Path, big: int) -> None:
    """A gzip stream named .tar: sample a, then b with a `big`-byte member of zeros, then c."""
    jpg = _encode(_picture(), "JPEG")
    members = [("a.jpg", jpg), ("a.txt", b"first"), ("b.txt", b"second"), ("b.jpg", bytes(big)),
               ("c.jpg", jpg), ("c.txt", b"third")]  # fmt: skip
    path.write_bytes(gzip.compress(_tar_bytes(members)))


def test_gzip_named_tar_with_a_big_member_is_a_counted_bad_shard(tmp_path, monkeypatch, caplog):
    big = 3 * 1024 * 1024
    _gzip_tar_with_a_big_member(tmp_path / "0.tar", big)
    assert (tmp_path / "0.tar").stat().st_size < 20_000
    plain = [("d.jpg", _encode(_picture(), "JPEG")), ("d.txt", b"fourth")]
    (tmp_path / "1.tar").write_bytes(_tar_bytes(plain))
    monkeypatch.setattr(tars, "MAX_MEMBER_BYTES", 1024 * 1024)
    read = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, m: read.append(m.name) or real(self, m))  # fmt: skip
    loader = _loader(str(tmp_path / "{0..1}.tar"))
    captions, logged = _captions_and_skips(loader, caplog)
    assert captions == ["first", "fourth"]
    # the shard ends at b.jpg: b's caption, read before it, is a sample without image
    counts = loader.skip_stats.counts
    assert counts["bad_tar"] == 1 and counts["no_image"] == 1
    assert "b.jpg" not in read  # never decompressed into memory
    (message,) = [m for m in logged if "bad_tar" in m]
    assert f"member b.jpg holds {big} bytes" in message and "gz-compressed" in message
    assert str(tmp_path / "0.tar") in loader.skip_stats.bad_urls


def test_evaluation_shard_with_a_big_member_is_refused(tmp_path, monkeypatch):
    _gzip_tar_with_a_big_member(tmp_path / "0.tar", 3 * 1024 * 1024)
    monkeypatch.setattr(tars, "MAX_MEMBER_BYTES", 1024 * 1024)
    pipe = evalsets._dataset([str(tmp_path / "0.tar")], lambda s: s["__key__"])
    with pytest.raises(ValueError, match="bad_tar: shard .*0.tar .*member b.jpg holds"):
        list(pipe)
    monkeypatch.setattr(tars, "MAX_MEMBER_BYTES", 4 * 1024 * 1024)
    assert list(pipe) == ["a", "b", "c"]  # under the bound a gzip shard reads as before


def test_tokens_of_normal_captions_unchanged_through_the_loader(tmp_path):
    jpg = _encode(_picture(), "JPEG")
    caps = ["a photo of a cat", "Two dogs, 3 birds & a café!", "日本語のキャプション"]
    members = [m for i, c in enumerate(caps) for m in ((f"{i}.jpg", jpg), (f"{i}.txt", c.encode()))]
    (tmp_path / "0.tar").write_bytes(_tar_bytes(members))
    import open_clip

    got = torch.cat([b["tokens"] for b in _loader(str(tmp_path / "0.tar"))])
    assert torch.equal(got, open_clip.tokenize(caps, context_length=24))


def _image_tree(root: Path, eps_as: str | None = None) -> Path:
    """An ImageFolder tree of two classes, one PNG and one JPEG each; ``eps_as`` adds EPS bytes
    under that file name in the first class."""
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        _picture(c).save(root / cls / "a.png")
        _picture(c + 2).save(root / cls / "b.jpg")
    if eps_as:
        (root / "cat" / eps_as).write_bytes(_encode(_picture(), "EPS"))
    return root


def test_local_image_files_open_with_their_extensions_decoder_only(tmp_path, monkeypatch):
    """ImageFolder trees, Karpathy, segmentation and ImageNet-S folders read local files
    through decode.open_image_file: EPS bytes named .jpg never reach the EPS plugin, a huge
    PNG is refused from its header, and normal files give torchvision's default loader's
    pixels."""
    from torchvision.datasets.folder import default_loader

    from aclip.data.decode import open_image_file
    from aclip.data.sets.imagefolder import load_imagefolder_classification

    good, _, _ = load_imagefolder_classification(_image_tree(tmp_path / "good"))
    assert len(good) == 4
    for (path, _), (img, _) in zip(good.samples, good, strict=True):
        assert np.array_equal(np.asarray(img), np.asarray(default_loader(path)))
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1))
    evil, _, _ = load_imagefolder_classification(_image_tree(tmp_path / "evil", "c.jpg"))
    index = [p for p, _ in evil.samples].index(str(tmp_path / "evil" / "cat" / "c.jpg"))
    with pytest.raises(ValueError, match=r"c\.jpg: not a JPEG, PNG, WEBP image"):
        evil[index]
    (tmp_path / "huge.png").write_bytes(_huge_png())
    with pytest.raises(ValueError, match="huge.png is 13000x13000"):
        open_image_file(tmp_path / "huge.png")
    (tmp_path / "doc.eps").write_bytes(_encode(_picture(), "EPS"))
    with pytest.raises(ValueError, match=r"doc\.eps: not an image file this reader opens"):
        open_image_file(tmp_path / "doc.eps")
    assert opened == []


def test_segmentation_labels_and_karpathy_images_refuse_other_formats(tmp_path, monkeypatch):
    from aclip.data.sets import karpathy
    from aclip.data.sets import segmentation as segsets

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1))
    eps = _encode(_picture(), "EPS")
    (tmp_path / "label.png").write_bytes(eps)
    (tmp_path / "photo.jpg").write_bytes(eps)
    with pytest.raises(ValueError, match=r"label\.png: not a PNG, JPEG, WEBP image"):
        segsets._read_label(tmp_path / "label.png")
    with pytest.raises(ValueError, match=r"photo\.jpg: not a JPEG, PNG, WEBP image"):
        karpathy.KarpathyDataset([(tmp_path / "photo.jpg", ["a cat"])])[0]
    assert opened == []
    # a real label map and photo still read as before
    label = (np.arange(1200).reshape(30, 40) % 5).astype(np.uint8)
    Image.fromarray(label).save(tmp_path / "l.png")
    assert np.array_equal(segsets._read_label(tmp_path / "l.png"), label)
    _picture(3).save(tmp_path / "p.png")
    img, captions = karpathy.KarpathyDataset([(tmp_path / "p.png", ["a cat"])])[0]
    assert captions == ["a cat"] and np.array_equal(np.asarray(img), np.asarray(_picture(3)))
