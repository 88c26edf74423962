"""Training checkpoints on disk: whole-or-invisible saves, choosing one to resume from, and
reading one outside the trainer (evaluation, studies).

A checkpoint is a DeepSpeed tag directory ``step_NNNNNNNN`` plus one ``rank_NNNNN.pt`` per rank;
it becomes visible only when rank 0 has written ``manifest.json`` (every file's size and CRC32)
and then moved ``latest`` to it. A crash mid-save leaves a directory without a manifest, which
is never resumed from and is deleted at the next save; a file damaged later fails its CRC and the
previous whole checkpoint is used instead.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from aclip.config import Config, config_from_yaml
from aclip.model import build_model
from aclip.model.clip import CLIP

MODEL_STATES = "mp_rank_00_model_states.pt"
IMAGE_SIDE = ("visual", "image_proj")


def find_checkpoint(path: str | Path) -> Path:
    """The model-states file behind ``path``: a run dir, its checkpoints dir, a tag dir or the file.

    A directory holding a ``latest`` file (DeepSpeed's pointer) resolves to the tag it names.
    """
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / "checkpoints", path):
        latest = candidate / "latest"
        if latest.is_file():
            path = candidate / latest.read_text().strip()
            break
    states = path / MODEL_STATES
    if not states.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (looked for {MODEL_STATES} or 'latest')")
    return states


def read_model_states(file: Path) -> dict:
    """The dict an aclip checkpoint's model-states file holds (``module``, ``config``, ...);
    ValueError naming ``file`` when it is not one (another project's checkpoint, a bare state
    dict, a file torch cannot read)."""
    try:
        states = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle, zip and format errors all mean: not a torch checkpoint
        raise ValueError(
            f"{file} is not an aclip checkpoint: torch.load cannot read it ({err}); expected a "
            f"run directory, its checkpoints/ or a step directory holding {MODEL_STATES}"
        ) from None
    missing = [k for k in ("module", "config") if not isinstance(states, dict) or k not in states]
    if missing:
        found = sorted(states)[:8] if isinstance(states, dict) else type(states).__name__
        raise ValueError(
            f"{file} is not an aclip checkpoint: it lacks {' and '.join(map(repr, missing))} "
            f"(found {found}); expected the {MODEL_STATES} that aclip's trainer saves"
        )
    return states


def load_eval_model(
    path: str | Path, use_ema: bool = False, device: str | torch.device = "cpu"
) -> tuple[CLIP, Config]:
    """The CLIP model of a checkpoint, fp32, in eval mode, with the run's config.

    With ``use_ema`` the image side (vision tower and image projection) comes from the EMA
    teacher; the text side is always the online one.
    """
    states = read_model_states(find_checkpoint(path))
    cfg = config_from_yaml(states["config"])
    model = build_model(cfg.model, cfg.loss)
    model.load_state_dict({k: v.float() for k, v in states["module"].items()})
    clip = model.clip
    if use_ema:
        ema = states.get("ema")
        if ema is None:
            raise ValueError(f"checkpoint {path} holds no EMA teacher (trained without one)")
        image_side = {k: v.float() for k, v in ema.items() if k.split(".")[0] in IMAGE_SIDE}
        missing = clip.load_state_dict(image_side, strict=False).missing_keys
        if any(k.split(".")[0] in IMAGE_SIDE for k in missing):
            raise ValueError(f"EMA teacher in {path} lacks image-side weights: {missing[:3]}")
    return clip.float().eval().to(device), cfg


# ---------------------------------------------------------------- whole-or-invisible saves
MANIFEST = "manifest.json"
LATEST = "latest"
_CHUNK = 1 << 22


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a mix:
    a temporary file beside it, flushed to disk, renamed over it, directory synced."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_digest(path: Path, sync: bool = False) -> dict[str, int]:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
        if sync:
            os.fsync(f.fileno())
    return {"size": path.stat().st_size, "crc32": crc}


def _payload_files(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def commit_checkpoint(ckpt_dir: Path, tag: str) -> None:
    """Make a fully written checkpoint visible: sync its files to disk, record their sizes and
    CRC32 in ``manifest.json``, then point ``latest`` at it. Call once, after every rank wrote.

    A crash before the manifest leaves an unlisted directory that ``latest`` never names.
    """
    tag_dir = ckpt_dir / tag
    files = {p.relative_to(tag_dir).as_posix(): _file_digest(p, sync=True)
             for p in _payload_files(tag_dir)}  # fmt: skip
    atomic_write_text(tag_dir / MANIFEST, json.dumps({"tag": tag, "files": files}, indent=1))
    atomic_write_text(ckpt_dir / LATEST, tag)


def verify_checkpoint(tag_dir: Path) -> str | None:
    """None if ``tag_dir`` holds exactly the files its manifest lists, with their sizes and
    CRC32; otherwise what is wrong (no manifest: the save never finished)."""
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return "no manifest (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest: {err}"
    for name, want in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['size']}"
        if _file_digest(path)["crc32"] != want["crc32"]:
            return f"{name} fails its CRC32 check"
    return None


def step_of(tag: str) -> int:
    """The step number of a ``step_NNNNNNNN`` tag (-1 for other names)."""
    digits = tag.removeprefix("step_")
    return int(digits) if digits.isdigit() else -1


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    """Every ``step_*`` directory, newest step first (whole or not)."""
    tags = [p.name for p in ckpt_dir.glob("step_*") if p.is_dir()]
    return sorted(tags, key=step_of, reverse=True)


def resume_candidates(ckpt_dir: Path) -> list[str]:
    """Tags to try, best first: the one ``latest`` names, then the other whole ones, newest
    first. A ``latest`` tag without a manifest (a checkpoint from before manifests) is kept."""
    latest = ckpt_dir / LATEST
    named = latest.read_text().strip() if latest.is_file() else None
    tags = [t for t in checkpoint_tags(ckpt_dir) if (ckpt_dir / t / MANIFEST).is_file()]
    if named and (ckpt_dir / named).is_dir():
        tags = [named] + [t for t in tags if t != named]
    return tags


def checkpoint_problem(tag_dir: Path) -> str | None:
    """None if ``tag_dir`` can be resumed from: it verifies against its manifest, or it is a
    DeepSpeed checkpoint from before manifests; otherwise what is wrong with it."""
    problem = verify_checkpoint(tag_dir)
    if problem and problem.startswith("no manifest") and _is_legacy(tag_dir):
        return None
    return problem


def choose_checkpoint(ckpt_dir: Path, log: Callable[[str], None] = print) -> str | None:
    """The newest checkpoint that verifies (see :func:`resume_candidates`); broken ones are
    reported through ``log`` and passed over. None when there is none."""
    for tag in resume_candidates(ckpt_dir):
        problem = checkpoint_problem(ckpt_dir / tag)
        if problem is None:
            return tag
        log(f"warning: checkpoint {ckpt_dir / tag} is not usable ({problem}); "
            "trying the previous one")  # fmt: skip
    return None


def _is_legacy(tag_dir: Path) -> bool:
    """A DeepSpeed checkpoint written before manifests existed (model states, no rank files)."""
    return (tag_dir / MODEL_STATES).is_file() and not any(tag_dir.glob("rank_*.pt"))


def prune_checkpoints(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete unfinished checkpoint directories and all but the newest ``keep`` whole ones
    (``keep`` <= 0 keeps every whole one). Call only while no save is being written."""
    latest = ckpt_dir / LATEST
    named = latest.read_text().strip() if latest.is_file() else None
    tags = checkpoint_tags(ckpt_dir)
    whole = [t for t in tags if (ckpt_dir / t / MANIFEST).is_file()]
    unfinished = [t for t in tags if t not in whole]
    doomed = [t for t in unfinished + (whole[keep:] if keep > 0 else []) if t != named]
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    return doomed
