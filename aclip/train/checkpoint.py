"""Training checkpoints: what one holds, saving it whole or not at all, choosing one, verifying
it and resuming from it. The file side (manifest, verification, choice, pruning) is
:mod:`aclip.train.checkpoint_files`; reading one outside the trainer (evaluation, export,
studies) is :mod:`aclip.interop.run`.

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
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aclip import distributed as dist_utils
from aclip.config import Config, ConfigError, config_from_yaml
from aclip.interop.safe_load import deepspeed_reads_safe, numpy_rng_globals
from aclip.interop.safe_load import load as safe_load
from aclip.train.checkpoint_files import (
    LATEST,
    MANIFEST,
    _choose,
    checkpoint_problem,
    commit_checkpoint,
    none_usable_message,
    prune_checkpoints,
    resume_candidates,
)


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
