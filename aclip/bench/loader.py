"""Data-loader benchmark: the full A-CLIP sample path on img2dataset-style shards.

Shards hold photo-like JPEGs (1/f-noise colour textures, which compress and decode like natural
photos, unlike flat synthetic shapes) at img2dataset's ``--resize_mode keep_ratio`` geometry
(shorter side ``src_size``) and quality 95, with a caption and a JSON member per sample. The
real ``aclip.data.pipeline.build_train_loader`` reads them: tar → decode → two online views +
EMA view + boxes (``ACLIPViews``) → tokens → batches. With 0 workers the main process does all
of it on one core (torch pinned to one thread): that is the per-core figure.
"""

from __future__ import annotations

import io
import json
import statistics
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from aclip.bench import common

_CAPTION_TEXT = (
    "a photo of the red blue green small large old new dog cat car tree house street person "
    "woman man child beach mountain city night sky water food table window"
)
WORDS: tuple[str, ...] = tuple(_CAPTION_TEXT.split())
TARGET_PER_CORE = 250.0  # A-CLIP samples/s per worker core (issue 16: enough to feed an H100)
PREFETCH_FACTOR = 4  # batches each worker of build_train_loader prefetches


@dataclass
class LoaderOptions:
    """Shards to read (or to write), model image size, batch and worker counts to try."""

    shards: str | None = None
    samples: int = 1024
    src_size: int = 256
    image_size: int = 224
    batch: int = 64
    workers: list[int] = field(default_factory=lambda: [0, 2])
    uint8: list[bool] = field(default_factory=lambda: [False, True])  # ACLIPViews(normalize=not)
    augment_on: list[str] = field(default_factory=lambda: ["cpu"])  # data.augment_on values
    batches: int = 12
    warmup_batches: int = 2
    seed: int = 0


def photo_like(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A colour image with a natural 1/f amplitude spectrum (JPEG-codes like a photograph)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(height, width)) ** 1.8
    planes = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, amplitude.shape)
        plane = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(height, width))
        planes.append((plane - plane.mean()) / (plane.std() + 1e-8))
    mix = rng.normal(0.0, 0.5, (3, 3)) + np.eye(3)  # correlated channels, varied colours
    pixels = np.stack(planes, -1) @ mix.T * 45.0 + rng.uniform(60, 190, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    out: Path, samples: int, src_size: int, per_shard: int = 256, seed: int = 0, distinct: int = 64
) -> str:
    """Write ``samples`` samples (``distinct`` different images, cycled) as img2dataset shards
    with ``_stats.json`` files; returns the brace spec of the shards."""
    rng = np.random.default_rng(seed)
    shapes = [(src_size, src_size), (src_size, src_size * 4 // 3), (src_size * 4 // 3, src_size)]
    jpegs = []
    for i in range(distinct):
        buf = io.BytesIO()
        photo_like(rng, *shapes[i % 3]).save(buf, "JPEG", quality=95)
        jpegs.append(buf.getvalue())
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-samples // per_shard)
    for shard in range(n_shards):
        count = min(per_shard, samples - shard * per_shard)
        with tarfile.open(out / f"{shard:05d}.tar", "w") as tar:
            for j in range(count):
                key = f"{shard:05d}{j:04d}"
                caption = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 16))))
                _member(tar, f"{key}.jpg", jpegs[(shard * per_shard + j) % distinct])
                _member(tar, f"{key}.txt", caption.encode())
                _member(tar, f"{key}.json", json.dumps({"key": key, "caption": caption}).encode())
        (out / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": count}))
    return str(out / f"{{00000..{n_shards - 1:05d}}}.tar")


def _views(opts: LoaderOptions, uint8: bool = False, augment_on: str = "cpu") -> Any:
    from aclip.data.gpu_views import DeviceViewInputs
    from aclip.data.views import ACLIPViews

    if augment_on == "gpu":  # the loader's half of the GPU path (always uint8)
        return DeviceViewInputs(opts.image_size, num_views=2, normalize=False)
    return ACLIPViews(opts.image_size, num_views=2, normalize=not uint8)


def _next_batches(
    spec: str, opts: LoaderOptions, workers: int, uint8: bool, augment_on: str = "cpu"
) -> tuple[float, float, dict]:
    """(wall seconds, this process's CPU seconds, last batch) for ``opts.batches`` batches."""
    from aclip.data.pipeline import build_train_loader
    from aclip.tokenizer import Tokenizer

    loader = build_train_loader(
        spec, Tokenizer(77), _views(opts, uint8, augment_on), opts.batch, workers, resampled=True,
        shuffle_buffer=256, seed=opts.seed,
    )  # fmt: skip
    batches = iter(loader)
    # drain what the workers prefetched meanwhile, so the timed batches are made while timed
    for _ in range(opts.warmup_batches + workers * PREFETCH_FACTOR):
        next(batches)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(opts.batches):
        batch = next(batches)
    return time.perf_counter() - t0, time.process_time() - cpu0, batch


def time_loader(
    spec: str, opts: LoaderOptions, workers: int, uint8: bool, augment_on: str = "cpu"
) -> dict[str, Any]:
    """Samples/s of ``build_train_loader`` with ``workers`` workers (0: all in this process,
    torch on one thread: the per-core figure, also given per CPU-second of this process, which
    other processes competing for the cores do not change). ``augment_on="gpu"``: the loader's
    half of the GPU path, plus the device's half timed on the last batch (:func:`time_device`)."""
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)
    try:
        wall, cpu, batch = _next_batches(spec, opts, workers, uint8, augment_on)
    finally:
        torch.set_num_threads(threads)
    samples = opts.batch * opts.batches
    device = time_device(batch, opts) if augment_on == "gpu" else {}
    if augment_on == "gpu":
        batch = batch | {"views": torch.empty(0, dtype=torch.uint8)}
    return {
        "workers": workers,
        "augment_on": augment_on,
        **device,
        "views_dtype": str(batch["views"].dtype).removeprefix("torch."),
        "samples_per_s": samples / wall,
        "samples_per_s_per_worker": samples / wall / max(workers, 1),
        "samples_per_cpu_s": samples / cpu if workers == 0 else None,
        "views_shape": list(batch["views"].shape if augment_on == "cpu" else batch["canvas"].shape),
    }


def time_device(batch: dict, opts: LoaderOptions, runs: int = 5) -> dict[str, Any]:
    """The device's half of the GPU path (``augment_batch``) on one loader batch: milliseconds
    per batch (median of ``runs`` after 2 warm-up runs, synchronised) on the GPU if there is
    one, else once on the CPU (all threads; seconds per batch there, not a figure to plan by)."""
    from aclip.data.gpu_views import CANVAS_KEYS, augment_batch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    moved = {k: batch[k].to(device) for k in CANVAS_KEYS}
    warmup, runs = (2, runs) if device.type == "cuda" else (0, 1)
    times = []
    for i in range(runs + warmup):
        common.synchronize(device)
        t0 = time.perf_counter()
        augment_batch(moved, opts.image_size)
        common.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    return {"device": str(device), "device_ms_per_batch": ms,
            "device_samples_per_s": opts.batch / ms * 1e3}  # fmt: skip


def stage_times(spec: str, opts: LoaderOptions, samples: int = 200) -> dict[str, float]:
    """CPU milliseconds per sample of each stage of the sample path, on one thread (median of 5
    runs over the same ``samples`` samples): decode, views (crops, colour; uint8, the
    trainer's CPU path), tokenize."""
    import webdataset as wds

    from aclip.data.decode import decode_sample
    from aclip.data.shards import expand_urls
    from aclip.tokenizer import Tokenizer

    raw = list(wds.DataPipeline(wds.SimpleShardList(expand_urls(spec)[0]),
                                wds.tarfile_to_samples()).iterator())[:samples]  # fmt: skip
    views, tokenizer = _views(opts, uint8=True), Tokenizer(77)  # the trainer's CPU path
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decoded = [decode_sample(s) for s in raw]
        stages = {
            "decode": lambda: [decode_sample(s) for s in raw],
            "views": lambda: [views(img) for img, _, _ in decoded],
            "tokenize": lambda: [tokenizer([cap]) for _, cap, _ in decoded],
        }
        out = {}
        for name, fn in stages.items():
            runs = []
            for _ in range(5):
                t0 = time.process_time()
                fn()
                runs.append((time.process_time() - t0) / len(raw) * 1e3)
            out[f"{name}_ms"] = statistics.median(runs)
    finally:
        torch.set_num_threads(threads)
    out["sum_ms"] = sum(out.values())
    return out


def run_loader_bench(opts: LoaderOptions) -> dict[str, Any]:
    """Write shards if none are given, time the loader per worker count, break down a sample."""
    with tempfile.TemporaryDirectory(prefix="aclip_loader_") as tmp:
        spec = opts.shards or write_shards(Path(tmp), opts.samples, opts.src_size, seed=opts.seed)
        runs = []
        for augment_on in opts.augment_on:
            for uint8 in opts.uint8 if augment_on == "cpu" else [True]:
                for workers in opts.workers:
                    print(f"[bench] loader: {workers} workers, augment on {augment_on}, "
                          f"uint8 views: {uint8}", flush=True)  # fmt: skip
                    runs.append(time_loader(spec, opts, workers, uint8, augment_on))
        stages = stage_times(spec, opts)
    # the target is judged on the trainer's CPU path: uint8 views when measured, else float
    one_core = sorted(
        (r for r in runs if r["workers"] == 0 and r["augment_on"] == "cpu"),
        key=lambda r: r["views_dtype"] != "uint8",
    )
    per_core = one_core[0]["samples_per_cpu_s"] if one_core else None
    views = one_core[0]["views_dtype"] if one_core else None
    return {
        "kind": "loader",
        "environment": common.environment(torch.device("cpu")),
        "shards": opts.shards or f"generated: {opts.samples} photo-like JPEGs, q95",
        "src_size": opts.src_size,
        "image_size": opts.image_size,
        "batch": opts.batch,
        "runs": runs,
        "stages_ms_per_sample_one_core": stages,
        "target_per_core": {
            "value": per_core,
            "views_dtype": views,
            "target_min": TARGET_PER_CORE,
            "met": None if per_core is None else per_core >= TARGET_PER_CORE,
        },
    }


def loader_table(payload: dict[str, Any]) -> str:
    """The loader runs and the per-stage breakdown as text."""
    keys = ("samples_per_s", "samples_per_s_per_worker", "samples_per_cpu_s")
    rows = [[r["workers"], r.get("augment_on", "cpu"), r["views_dtype"], *(r[k] for k in keys),
             r.get("device_ms_per_batch")] for r in payload["runs"]]  # fmt: skip
    header = ["workers", "augment on", "views", "samples/s (wall)", "per worker (wall)",
              "per CPU-second", "device ms/batch"]  # fmt: skip
    table = common.format_table(header, rows)
    stages = payload["stages_ms_per_sample_one_core"]
    parts = ", ".join(f"{k[:-3]} {v:.2f} ms" for k, v in stages.items())
    target = payload["target_per_core"]
    lines = [table, "", f"one core, CPU time per sample: {parts}"]
    if target["value"] is not None:
        verdict = (
            "met"
            if target["met"]
            else (f"MISSED by {100 * (1 - target['value'] / target['target_min']):.1f}%")
        )
        lines.append(f"loader_per_core ({target['views_dtype']} views, as the trainer uses): "
                     f"{target['value']:.0f} samples per CPU-second "
                     f"(target >= {target['target_min']:.0f}) {verdict}")  # fmt: skip
    env = payload["environment"]
    lines.append(f"{env['device']}, {payload['src_size']}-px JPEGs -> {payload['image_size']} px, "
                 f"load avg {env['load_average_1m']:.2f}")  # fmt: skip
    return "\n".join(lines)
