"""A checkpoint's files, whole or invisible: written, listed in a manifest, verified, chosen and
pruned (the file side of :mod:`aclip.train.checkpoint`).

A checkpoint (DeepSpeed's tag directory ``checkpoints/step_NNNNNNNN/``) becomes visible only when
rank 0 has written ``manifest.json`` (every file's size and CRC32) and then moved ``latest`` to
it. A crash mid-save leaves a directory without a manifest, which is never resumed from and is
deleted at the next save; a file damaged later fails its CRC and the previous whole checkpoint is
used instead, and pruning counts only whole checkpoints among those it keeps.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aclip.interop.run import MODEL_STATES

MANIFEST = "manifest.json"
LATEST = "latest"
_CHUNK = 1 << 22


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a mix:
    a temporary file beside it, flushed to disk, renamed over it, directory synced."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no stray temporary file
        raise
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
    _CRC_CHECKED[_crc_key(tag_dir, files)] = None  # its CRC32s were just read from its files
    atomic_write_text(ckpt_dir / LATEST, tag)


# The CRC32 verdict (None: all match; else the problem) on checkpoints this process wrote or
# read once, keyed by the tag directory and every file's name, size and mtime: a file rewritten
# since (damaged, repaired) no longer matches the key and is read again. Re-reading every older
# checkpoint's CRC32s at each save (pruning) would cost gigabytes per save.
_CRC_CHECKED: dict[tuple, str | None] = {}


def _crc_key(tag_dir: Path, files: dict[str, Any]) -> tuple:
    stats = [(name, (tag_dir / name).stat()) for name in sorted(files)]
    return (str(tag_dir.resolve()), *((n, st.st_size, st.st_mtime_ns) for n, st in stats))


def manifest_problem(manifest: Any) -> str | None:
    """None if ``manifest`` (parsed ``manifest.json``) has the shape :func:`commit_checkpoint`
    writes: ``{"files": {name: {"size": int, "crc32": int}, ...}}``, non-empty, listing the
    model-states file, names inside the tag directory; otherwise what is wrong with it."""
    if not isinstance(manifest, dict) or "files" not in manifest:
        return f"manifest is not a {{'files': {{...}}}} object (found {_kind(manifest)})"
    if not isinstance(manifest["files"], dict):
        return f"manifest's 'files' is not an object (found {_kind(manifest['files'])})"
    files = manifest["files"]
    if MODEL_STATES not in files:
        listed = f"lists {len(files)} files" if files else "is empty"
        return f"manifest {listed} without {MODEL_STATES}"
    for name, entry in files.items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            return f"manifest names {name!r}, not a file inside the checkpoint"
        fields = entry if isinstance(entry, dict) else {}
        if not all(type(fields.get(k)) is int for k in ("size", "crc32")):
            return f"manifest entry for {name} is not {{'size': int, 'crc32': int}} ({entry!r})"
    return None


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return f"keys {sorted(map(str, value))[:5]}"
    return "null" if value is None else type(value).__name__


def verify_checkpoint(tag_dir: Path, crc: bool = True) -> str | None:
    """None if ``tag_dir`` holds exactly the files its manifest lists, with their sizes and
    CRC32; otherwise what is wrong (no manifest: the save did not finish; a manifest of the
    wrong shape: see :func:`manifest_problem`). ``crc=False`` checks the sizes only (no file
    is read); a checkpoint whose CRC32s matched in this process is not read again."""
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return _no_manifest(tag_dir)
    try:
        parsed = json.loads(manifest.read_text())
    except (ValueError, OSError) as err:
        return f"unreadable manifest: {err}"
    problem = manifest_problem(parsed)
    if problem:
        return problem
    files = parsed["files"]
    for name, want in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['size']}"
    if not crc:
        return None
    key = _crc_key(tag_dir, files)
    if key not in _CRC_CHECKED:
        bad = (
            n for n, want in files.items() if _file_digest(tag_dir / n)["crc32"] != want["crc32"]
        )
        name = next(bad, None)
        _CRC_CHECKED[key] = None if name is None else f"{name} fails its CRC32 check"
    return _CRC_CHECKED[key]


def _no_manifest(tag_dir: Path) -> str:
    """Why ``tag_dir`` has no manifest: it does not exist, holds no checkpoint, or its save did
    not finish (a checkpoint's files without the manifest written last)."""
    if not tag_dir.exists():
        return "no manifest: the directory does not exist"
    if not tag_dir.is_dir():
        return "no manifest: not a directory (a checkpoint is a step_NNNNNNNN directory)"
    if not (tag_dir / MODEL_STATES).is_file():
        return (f"no manifest: not a checkpoint directory (no {MANIFEST}, no {MODEL_STATES}; "
                "a checkpoint is a checkpoints/step_NNNNNNNN directory)")  # fmt: skip
    return "no manifest (the save did not finish)"


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


def checkpoint_problem(tag_dir: Path, crc: bool = True) -> str | None:
    """None if ``tag_dir`` can be resumed from: it verifies against its manifest, or it is a
    DeepSpeed checkpoint from before manifests; otherwise what is wrong with it. ``crc``: as in
    :func:`verify_checkpoint`."""
    problem = verify_checkpoint(tag_dir, crc)
    if problem and problem.startswith("no manifest") and _is_legacy(tag_dir):
        return None
    return problem


def choose_checkpoint(ckpt_dir: Path, log: Callable[[str], None] = print) -> str | None:
    """The newest checkpoint that verifies (see :func:`resume_candidates`); broken ones are
    reported through ``log`` and passed over. None when there is none."""
    return _choose(ckpt_dir, log)[0]


def _choose(
    ckpt_dir: Path, log: Callable[[str], None] = print, crc: bool = True
) -> tuple[str | None, dict[str, str]]:
    """:func:`choose_checkpoint`'s tag, and the problem of each candidate passed over."""
    problems: dict[str, str] = {}
    for tag in resume_candidates(ckpt_dir):
        problem = checkpoint_problem(ckpt_dir / tag, crc)
        if problem is None:
            return tag, problems
        problems[tag] = problem
        log(f"warning: checkpoint {ckpt_dir / tag} is not usable ({problem}); "
            "trying the previous one")  # fmt: skip
    return None, problems


def none_usable_message(ckpt_dir: Path, problems: dict[str, str]) -> str:
    """Why ``train.resume=latest`` refuses to start when every checkpoint in ``ckpt_dir`` is
    damaged (starting at step 0 then would silently throw the run away), and the way out."""
    listed = "; ".join(f"{tag}: {problem}" for tag, problem in problems.items())
    return (
        f"train.resume=latest: none of the {len(problems)} checkpoints in {ckpt_dir} can be "
        f"resumed from ({listed}). Nothing was started. To start afresh at step 0, move them "
        f"aside (mv {ckpt_dir} {ckpt_dir}.damaged) and run again; to resume one of them, repair "
        "it and give train.resume=<its step directory>"
    )


def _is_legacy(tag_dir: Path) -> bool:
    """A DeepSpeed checkpoint written before manifests existed (model states, no rank files)."""
    return (tag_dir / MODEL_STATES).is_file() and not any(tag_dir.glob("rank_*.pt"))


def prune_checkpoints(ckpt_dir: Path, keep: int, log: Callable[[str], None] = print) -> list[str]:
    """Delete unfinished checkpoint directories, and every checkpoint older than the newest
    ``keep`` ones that verify (``keep`` <= 0 keeps every whole one). A damaged checkpoint is not
    counted among those kept, so a good older one is not deleted for it; it goes once ``keep``
    newer good ones exist. Call only while no save is being written.

    Cost: the checkpoint just saved and those this process verified or wrote before are known
    good (:data:`_CRC_CHECKED`; their sizes and dates are checked, nothing is read); only one
    written before this process started is read for its CRC32s, once."""
    latest = ckpt_dir / LATEST
    named = latest.read_text().strip() if latest.is_file() else None
    tags = checkpoint_tags(ckpt_dir)
    whole = [t for t in tags if (ckpt_dir / t / MANIFEST).is_file()]
    doomed = [t for t in tags if t not in whole]
    good = 0
    for i, tag in enumerate(whole if keep > 0 else []):
        if good == keep:
            doomed += whole[i:]
            break
        problem = checkpoint_problem(ckpt_dir / tag)
        if problem is None:
            good += 1
        else:
            log(f"warning: checkpoint {ckpt_dir / tag} is damaged ({problem}); not counted "
                f"among the {keep} kept")  # fmt: skip
    doomed = [t for t in doomed if t != named]
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    return doomed
