"""Training checkpoints: what one holds, saving it whole or not at all, choosing one, verifying
it, resuming from it, and reading one outside the trainer (evaluation, export, studies).

What a checkpoint holds, in the DeepSpeed tag directory ``checkpoints/step_NNNNNNNN/``:

- the engine's files (``mp_rank_00_model_states.pt``: the student's weights, DeepSpeed's own
  counters, and our client state: ``step``, ``samples_seen``, the run's ``config`` (YAML) and the
  method's state, e.g. A-CLIP's EMA teacher as ``ema``; ``*optim_states.pt``: the optimizer and
  LR schedule, one file per rank under ZeRO);
- ``rank_NNNNN.pt`` per rank: the world size, that rank's data stream (position ``data`` and skip
  counts ``skips``) and its RNG states ``rng``;
- ``aclip_config.yaml`` (the config again, readable) and ``manifest.json`` (every file's size
  and CRC32).

It becomes visible only when rank 0 has written ``manifest.json`` and then moved ``latest`` to
it. A crash mid-save leaves a directory without a manifest, which is never resumed from and is
deleted at the next save; a file damaged later fails its CRC and the previous whole checkpoint is
used instead (when none is whole, ``train.resume=latest`` refuses to start rather than start at
step 0), and pruning counts only whole checkpoints among those it keeps. A save that fails (a
full disk) removes its half-written directory and raises :class:`CheckpointSaveError`. A
checkpoint resumes a run whose method and model shapes agree
(:func:`check_compatible`); exactly (same batches, same random draws) when the world size and
number of loader workers agree too, else the data stream restarts at the samples seen.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aclip import distributed as dist_utils
from aclip.config import Config, ConfigError, config_from_yaml
from aclip.interop.safe_load import (
    CheckpointError,
    UnsafeCheckpointError,
    deepspeed_reads_safe,
    numpy_rng_globals,
)
from aclip.interop.safe_load import load as safe_load
from aclip.model import build_clip
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
    """The dict an aclip checkpoint's model-states file holds (``module``, ``config``, ...), read
    without running code (:mod:`aclip.interop.safe_load`). CheckpointError (a ValueError) naming
    ``file`` when it is not one (another project's checkpoint, a bare state dict, an image or
    other non-checkpoint file, said by its magic bytes) or holds types that could run code
    (UnsafeCheckpointError)."""
    try:
        states = safe_load(file)
    except UnsafeCheckpointError:
        raise  # names the file and the types it would build
    except CheckpointError as err:
        raise CheckpointError(
            f"not an aclip checkpoint: {err}; expected a run directory, its checkpoints/ or a "
            f"step directory holding {MODEL_STATES}"
        ) from None
    missing = [k for k in ("module", "config") if not isinstance(states, dict) or k not in states]
    if missing:
        found = sorted(states)[:8] if isinstance(states, dict) else type(states).__name__
        raise CheckpointError(
            f"{file} is not an aclip checkpoint: it lacks {' and '.join(map(repr, missing))} "
            f"(found {found}); expected the {MODEL_STATES} that aclip's trainer saves"
        )
    return states


def has_ema_teacher(path: str | Path) -> bool:
    """Whether the aclip checkpoint at ``path`` (run, checkpoints or step directory) holds an
    EMA teacher (a method without one, such as ``clip``, saves none)."""
    return read_model_states(find_checkpoint(path)).get("ema") is not None


def load_eval_model(
    path: str | Path, use_ema: bool = False, device: str | torch.device = "cpu"
) -> tuple[CLIP, Config]:
    """The CLIP model of a checkpoint, fp32, in eval mode, with the run's config. A bf16/fp16
    run's weights are the fp32 master weights its optimizer kept, not the rounded module copies.

    With ``use_ema`` the image side (vision tower and image projection) comes from the EMA
    teacher; the text side is always the online one.
    """
    states_file = find_checkpoint(path)
    states = read_model_states(states_file)
    cfg = config_from_yaml(states["config"])
    clip = build_clip(cfg.model)
    module = _fp32_module(states["module"], states_file.parent)
    try:
        clip.load_state_dict({k[5:]: v.float() for k, v in module.items() if k.startswith("clip.")})
    except RuntimeError as err:  # missing, unexpected or misshapen keys: a damaged checkpoint
        raise ValueError(f"{states_file}: its weights do not fit the model its config "
                         f"describes ({str(err).splitlines()[0]} ...)") from None  # fmt: skip
    if use_ema:
        ema = states.get("ema")
        if ema is None:
            raise ValueError(f"checkpoint {path} holds no EMA teacher (trained without one)")
        image_side = {k: v.float() for k, v in ema.items() if k.split(".")[0] in IMAGE_SIDE}
        missing = clip.load_state_dict(image_side, strict=False).missing_keys
        if any(k.split(".")[0] in IMAGE_SIDE for k in missing):
            raise ValueError(f"EMA teacher in {path} lacks image-side weights: {missing[:3]}")
    return clip.float().eval().to(device), cfg


def _fp32_module(module: dict[str, torch.Tensor], tag_dir: Path) -> dict[str, torch.Tensor]:
    """The student's weights at full precision: as saved for an fp32 run; for a bf16/fp16 run
    (whose saved module holds rounded copies) the fp32 master weights the optimizer kept,
    merged from every rank's ZeRO shards by DeepSpeed's own ``zero_to_fp32``."""
    half = (torch.bfloat16, torch.float16)
    if not any(v.dtype in half for v in module.values() if torch.is_tensor(v)):
        return module
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with deepspeed_reads_safe():  # zero_to_fp32 unpickles without restriction otherwise
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except CheckpointError:
        raise
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise ValueError(
            f"{tag_dir} holds half-precision weights and its fp32 master weights (the ZeRO "
            f"optimizer states) cannot be read: {err}"
        ) from None


# ---------------------------------------------------------------- whole-or-invisible saves
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


# ---------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every rank the same: identical initial weights)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The RNG states a resumed run needs to continue as the uninterrupted one."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's uint32 key array as an int64 tensor: read back exactly, and without numpy types
        # (which a checkpoint read by aclip.interop.safe_load must not need)
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]  # keys: a tensor; a numpy array in older rank files
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- save and resume
CONFIG_FILE = "aclip_config.yaml"
FieldsOf = Callable[[Config], dict[str, Any]]


def check_compatible(cfg: Config, tag_dir: Path, fields_of: FieldsOf) -> None:
    """Refuse to resume from a checkpoint whose method or model shapes differ from ``cfg``'s
    (``fields_of``: the config values that decide them), naming the differing keys."""
    saved_file = tag_dir / CONFIG_FILE
    if not saved_file.is_file():
        return  # written by every save; absent only for checkpoints from elsewhere
    saved, ours = fields_of(config_from_yaml(saved_file.read_text())), fields_of(cfg)
    diff = [
        f"{k}: checkpoint {saved.get(k)!r}, config {ours.get(k)!r}"
        for k in {**saved, **ours}
        if saved.get(k) != ours.get(k)
    ]
    if diff:
        raise ConfigError(
            f"checkpoint {tag_dir} was made with another model; differing keys: " + "; ".join(diff)
        )


def check_resume(cfg: Config, crc: bool = True) -> None:
    """Pre-flight of ``train.resume``: FileNotFoundError when it names a directory that does not
    exist, ConfigError when it names one that cannot be resumed from (why: CRC32 mismatch, no
    manifest, ...) or when it is ``latest`` and checkpoints exist but none can. ``crc=False``
    checks sizes only (the trainer's rank 0 reads the CRC32s before resuming)."""
    which = cfg.train.resume
    if which in ("", "latest"):
        ckpt_dir = Path(cfg.train.output_dir) / "checkpoints"
        if which and ckpt_dir.is_dir():
            tag, problems = _choose(ckpt_dir, lambda _: None, crc)
            if tag is None and problems:
                raise ConfigError(none_usable_message(ckpt_dir, problems))
        return
    if not Path(which).exists():
        raise FileNotFoundError(
            f"train.resume: {which} does not exist (give a checkpoint's step directory, "
            f"{cfg.train.output_dir}/checkpoints/step_NNNNNNNN, or train.resume=latest)"
        )
    problem = checkpoint_problem(Path(which), crc)
    if problem:
        raise ConfigError(f"train.resume: checkpoint {which} is not usable: {problem}")


def will_resume(cfg: Config) -> bool:
    """Whether ``cfg``'s run will resume from a checkpoint (``train.resume`` names one, or is
    ``latest`` and a whole one exists): its weights then come from there, not ``init_from``."""
    which = cfg.train.resume
    if not which:
        return False
    if which != "latest":
        return True
    ckpt_dir = Path(cfg.train.output_dir) / "checkpoints"
    return ckpt_dir.is_dir() and bool(resume_candidates(ckpt_dir))


@dataclass
class Counters:
    """The trainer's counters: optimizer steps taken and training samples seen (all ranks)."""

    step: int = 0
    samples_seen: int = 0


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (a full disk, ...); its half-written directory was
    removed and ``latest`` still names the previous checkpoint."""


# What torch's zip writer raises when the OS refused a write (the OSError itself is lost in C++
# when torch.save writes to a path): "[enforce fail at inline_container.cc] unexpected pos ...".
_TORCH_WRITE_FAILED = ("unexpected pos", "iostream error", "PytorchStreamWriter failed")


def _save_file(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so that a refused write surfaces as the OSError
    naming ``path`` (a path given to torch.save ends in "unexpected pos ..." instead)."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as err:
        cause = _os_error_in(err)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from err
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err


def _os_error_in(err: BaseException) -> OSError | None:
    """The first OSError in ``err``'s chain (itself, its cause or context), if any."""
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        if isinstance(link, OSError):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None


def _probe_write(folder: Path) -> OSError | None:
    """The error writing (and syncing) 1 MiB in ``folder`` gives, if any: what a torch writer
    that lost its OSError ran into (a full disk, a quota)."""
    probe = folder / f".aclip_write_probe{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as err:
        return err
    finally:
        probe.unlink(missing_ok=True)


def _save_error(err: BaseException, tag_dir: Path) -> BaseException:
    """What to raise for ``err``, met writing the checkpoint ``tag_dir`` (removed since): for an
    OS error (seen in its chain, or found by a probe write after torch's writer failed), a
    :class:`CheckpointSaveError` saying what the OS said and that ``latest`` is unchanged;
    any other error as it is."""
    os_err, where = _os_error_in(err), tag_dir
    if os_err is None and any(text in str(err) for text in _TORCH_WRITE_FAILED):
        os_err = _probe_write(tag_dir.parent)  # DeepSpeed's torch.save to a path lost it
    elif os_err is not None:
        where = os_err.filename or tag_dir
    if os_err is None:
        return err
    what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}.get(
        os_err.errno or 0, os_err.strerror or str(os_err)
    )
    latest = tag_dir.parent / LATEST
    previous = (f"{latest} still names {latest.read_text().strip()}" if latest.is_file()
                else "no earlier checkpoint exists")  # fmt: skip
    error = CheckpointSaveError(
        f"cannot save checkpoint {tag_dir}: {what} (writing {where}); the half-written save "
        f"was removed and {previous}. Free space there (or lower train.keep_checkpoints), then "
        "run again with train.resume=latest"
    )
    error.errno = os_err.errno  # the message alone as str(error), the OS's code kept
    return error


class Checkpointer:
    """Saves and resumes the run's checkpoints in ``ckpt_dir`` (see the module docstring).

    ``method`` and ``stream`` are the run's training method and data stream: each gives its
    state (``state_dict``) and takes it back (``load_state_dict``); ``fields_of`` says which
    config values a checkpoint must share with the run to resume it.
    """

    def __init__(
        self, ckpt_dir: Path, dist: dist_utils.DistInfo, keep: int, fields_of: FieldsOf
    ) -> None:
        self.ckpt_dir, self.dist, self.keep, self.fields_of = ckpt_dir, dist, keep, fields_of
        self.saved_step = -1

    def save(self, engine: Any, counters: Counters, method: Any, stream: Any, config: str) -> Path:
        """Engine, counters, method state and config, and per rank its stream and RNG; visible
        (``latest``) only once every rank has written its part. A step saved already is not
        saved again. A write that fails on any rank (a full disk, ...) raises
        :class:`CheckpointSaveError` on every rank, its half-written directory removed."""
        tag = f"step_{counters.step:08d}"
        tag_dir = self.ckpt_dir / tag
        if self.saved_step == counters.step and (tag_dir / MANIFEST).is_file():
            return tag_dir
        if self.dist.is_main and tag_dir.exists():
            shutil.rmtree(tag_dir)  # an unfinished or stale save of this step
        dist_utils.barrier()
        client = {"step": counters.step, "samples_seen": counters.samples_seen}
        client |= method.state_dict() | {"config": config}

        def write_parts() -> None:
            engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client,
                                   save_latest=False)  # fmt: skip
            tag_dir.mkdir(parents=True, exist_ok=True)
            rank = {"world_size": self.dist.world_size, **stream.state_dict(), "rng": rng_state()}
            _save_file(rank, tag_dir / f"rank_{self.dist.rank:05d}.pt")

        def commit() -> None:
            (tag_dir / CONFIG_FILE).write_text(config)
            commit_checkpoint(self.ckpt_dir, tag)

        self._all_or_none(write_parts, tag_dir)  # every rank's part, then (rank 0) the commit
        self._all_or_none(commit if self.dist.is_main else None, tag_dir)
        if self.dist.is_main:
            prune_checkpoints(self.ckpt_dir, self.keep)
        dist_utils.barrier()
        self.saved_step = counters.step
        return tag_dir

    def _all_or_none(self, write: Callable[[], None] | None, tag_dir: Path) -> None:
        """Run ``write`` (this rank's part of a save; None: nothing) and agree over the ranks
        whether every part was written; when one was not, rank 0 removes the half-written
        ``tag_dir`` (``latest`` still names the previous checkpoint) and every rank raises."""
        failure: BaseException | None = None
        try:
            if write is not None:
                write()
        except Exception as err:  # reported below on every rank, or re-raised as it is
            failure = err
        flag = torch.tensor([float(failure is not None)], device=self.dist.device)
        if not dist_utils.all_reduce_max(flag).item():
            return
        if self.dist.is_main:
            shutil.rmtree(tag_dir, ignore_errors=True)
        dist_utils.barrier()
        if failure is None:
            raise CheckpointSaveError(f"cannot save checkpoint {tag_dir}: another rank failed "
                                      "to write its part (see its error); the half-written "
                                      "save was removed")  # fmt: skip
        error = _save_error(failure, tag_dir)
        if error is failure:
            raise failure
        raise error from failure

    def choose(self, which: str = "latest") -> Path | None:
        """The tag directory to resume from: ``latest`` (or "") picks the newest whole one, any
        other value is a tag directory, checked (rank 0 reads the files, every rank gets the
        same). ConfigError when the named one, or with ``latest`` every one, is unusable."""
        if which not in ("", "latest"):
            tag_dir = Path(which)
            problem = checkpoint_problem(tag_dir) if self.dist.is_main else None
            problem = dist_utils.broadcast_object(problem)
            if problem:
                raise ConfigError(f"train.resume: checkpoint {tag_dir} is not usable: {problem}")
            return tag_dir
        tag, error = None, None
        if self.dist.is_main and self.ckpt_dir.is_dir():
            tag, problems = _choose(self.ckpt_dir)
            if tag is None and problems:
                error = none_usable_message(self.ckpt_dir, problems)
        tag, error = dist_utils.broadcast_object((tag, error))
        if error:
            raise ConfigError(error)
        return None if tag is None else self.ckpt_dir / tag

    def resume(
        self, engine: Any, method: Any, stream: Any, cfg: Config, which: str = "latest"
    ) -> Counters | None:
        """Load the checkpoint :meth:`choose` picks into the engine, the method and the stream;
        its counters, or None when there is none. Refused (ConfigError) for another model."""
        tag_dir = self.choose(which)
        if tag_dir is None:
            return None
        check_compatible(cfg, tag_dir, self.fields_of)
        with deepspeed_reads_safe():  # DeepSpeed's reads unpickle without restriction otherwise
            load_path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        if load_path is None:
            raise FileNotFoundError(f"no loadable checkpoint in {tag_dir}")
        counters = Counters(int(client["step"]), int(client["samples_seen"]))
        self.saved_step = counters.step
        method.load_state_dict(client)
        self._resume_rank(tag_dir, client, stream, counters.samples_seen)
        return counters

    def _resume_rank(self, tag_dir: Path, client: dict, stream: Any, samples_seen: int) -> None:
        """This rank's stream and RNG; saved with another world size or number of workers, the
        stream restarts at the samples seen instead (not sample-exact), and says so."""
        path = tag_dir / f"rank_{self.dist.rank:05d}.pt"
        # older rank files hold numpy's RNG key array as a numpy array: those types allowed here
        state = safe_load(path, extra_globals=numpy_rng_globals()) if path.is_file() else None
        same_world = state is not None and state["world_size"] == self.dist.world_size
        if same_world and stream.load_state_dict(state, samples_seen):
            set_rng_state(state["rng"])
            return
        if not same_world:
            stream.load_state_dict(None, samples_seen)
        if self.dist.is_main:
            print(f"note: {tag_dir} was saved with another world size or number of data "
                  f"workers; the data stream restarts at sample {samples_seen}",
                  flush=True)  # fmt: skip
        if client.get("rng") is not None:
            set_rng_state(client["rng"])
