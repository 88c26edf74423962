"""One training run per output directory: ``train.py`` holds a lock on a file there for as long
as it runs, and a second ``train.py`` on the same ``train.output_dir`` is refused, naming the
holder (two runs interleaved their checkpoints, and one crashed deleting the other's).

The lock is a POSIX record lock (``fcntl.lockf``): the kernel drops it when the holding process
ends, however it ends (``kill -9``, a preempted SLURM job that is requeued: the next start gets
it), it is not inherited by forked data-loader workers (which may outlive a killed parent for a
moment), and NFS carries it between hosts. Only global rank 0 takes it: every rank of one run
shares the directory. A file system without locks (e.g. Lustre mounted without ``flock``) gives
a warning and the run goes on unlocked.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

from aclip.config import ConfigError

LOCK_FILE = ".aclip_train.lock"
# lock files this process holds (resolved path -> descriptor): a POSIX lock belongs to the
# process, and closing any descriptor of the file would drop it, so the file is opened once
_HELD: dict[str, int] = {}


class OutputDirBusy(ConfigError):
    """Another training run holds ``train.output_dir``."""


def lock_output_dir(out: str | Path) -> Path:
    """Take the run lock of ``out`` (created if needed) for this process, and write who holds it
    (pid, host, start time, SLURM job) into the lock file; returns the lock file. OutputDirBusy
    naming the holder when another process holds it; PermissionError when ``out`` is unwritable."""
    path = Path(out) / LOCK_FILE
    key = str(path.resolve())
    if key in _HELD:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise PermissionError(f"train.output_dir: cannot write to {out} ({err.strerror})") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: held by another process
        holder = os.pread(fd, 4096, 0).decode(errors="replace")
        os.close(fd)
        raise OutputDirBusy(_busy_message(out, path, holder)) from None
    except OSError as err:  # no locks on this file system
        os.close(fd)
        warnings.warn(f"train.output_dir: cannot lock {path} ({err.strerror}); a second run on "
                      f"{out} would not be stopped", stacklevel=2)  # fmt: skip
        return path
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    os.fsync(fd)
    _HELD[key] = fd
    return path


def release_output_dir(out: str | Path | None) -> None:
    """Give up the run lock of ``out`` if this process holds it (the lock file stays)."""
    if out is None:
        return
    fd = _HELD.pop(str((Path(out) / LOCK_FILE).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing drops the lock


def _holder() -> dict[str, object]:
    """Who takes the lock: this process."""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    info: dict[str, object] = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
    if os.environ.get("SLURM_JOB_ID"):
        info["slurm_job"] = os.environ["SLURM_JOB_ID"]
    return info


def _busy_message(out: str | Path, path: Path, holder: str) -> str:
    try:
        info = json.loads(holder)
        who = f"pid {info['pid']} on host {info['host']}, started {info['started']}"
        who += f", SLURM job {info['slurm_job']}" if "slurm_job" in info else ""
    except (ValueError, KeyError, TypeError):
        who = "a process that has not written its name yet"
    return (
        f"train.output_dir: {out} is in use by another training run ({who}; lock file {path}). "
        "Wait for it to end or stop it, or give another train.output_dir. If that process no "
        f"longer runs (its node crashed and the file system kept the lock), delete {path}"
    )
