"""Pretrain CLIP / FLIP / A-CLIP.

python train.py --config configs/demo.yaml [section.key=value ...]
torchrun --nproc-per-node 8 train.py --config configs/yfcc15m_vit_b16.yaml
srun python train.py --config ...            (see launch/yfcc15m.sh)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys

from aclip.config import Config, ConfigError, load_config
from aclip.data.skips import LoaderStalled, SkipLimitExceeded
from aclip.interop import WeightsError
from aclip.interop.safe_load import CheckpointError
from aclip.train.checkpoint import CheckpointSaveError
from aclip.train.numerics import NonFiniteLoss
from aclip.train.preflight import check_paths, check_resume
from aclip.train.runlock import lock_output_dir, release_output_dir

EXIT_STOPPED = 3  # stopped on a signal, checkpoint saved: run again with train.resume=latest


def parse_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    """The config path and the dotted overrides."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", help="YAML run config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def run(cfg: Config) -> dict:
    """Build everything, train (resuming when asked), evaluate, close. Returns the final metrics;
    after a stop signal, ``{"step": N, "stopped": <signal name>}`` without evaluating."""
    from aclip.distributed import init_distributed
    from aclip.train.trainer import Trainer

    dist_info = init_distributed()
    if dist_info.is_main:
        print(f"world size {dist_info.world_size}, rank 0 of {dist_info.world_size}", flush=True)
    trainer = Trainer(cfg, dist_info)
    if cfg.train.resume and trainer.resume(cfg.train.resume) and dist_info.is_main:
        print(f"resumed at step {trainer.step}", flush=True)
    if not trainer.fit():
        ignore_stop_signals()
        trainer.close()
        name = signal.Signals(trainer.stop_signal or signal.SIGTERM).name
        return {"step": trainer.step, "stopped": name}
    results: dict = {"step": trainer.step}
    try:  # a set that fails is recorded as {"error": ...}; results.json is written regardless
        results |= trainer.evaluate()
    finally:
        trainer.write_results(results)  # rank 0 only
    if dist_info.is_main:
        print(f"run directory: {trainer.run_dir} (tensorboard --logdir {trainer.run_dir / 'tb'})")
    trainer.close()
    return results


def ignore_stop_signals() -> None:
    """After a stop (checkpoint saved), SIGTERM and SIGUSR1 are ignored while the run closes and
    exits: under ``srun --kill-on-bad-exit`` the first rank to exit with EXIT_STOPPED makes srun
    SIGTERM the ranks still closing, which then died with 143 instead of exiting with the stop
    code (seen under load in tests/test_slurm.py)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def requeue_slurm_job() -> bool:
    """Put this SLURM job back in the queue (``scontrol requeue``); False outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or shutil.which("scontrol") is None:
        return False
    print(f"requeueing job {job}", flush=True)  # SLURM ends this job's tasks at once
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"scontrol requeue {job} failed: {done.stderr.strip()}", file=sys.stderr)
        return False
    return True


def after_stop(results: dict) -> int:
    """Exit code after a stop signal: on SIGUSR1 (SLURM's warning before the time limit) rank 0
    requeues the job and the run exits 0; otherwise it exits EXIT_STOPPED (checkpoint saved)."""
    if results["stopped"] != "SIGUSR1" or not os.environ.get("SLURM_JOB_ID"):
        return EXIT_STOPPED
    if os.environ.get("RANK", "0") == "0":
        return 0 if requeue_slurm_job() else EXIT_STOPPED
    return 0


def lock_run(cfg: Config) -> str | None:
    """Rank 0 takes the run lock of ``train.output_dir`` (:mod:`aclip.train.runlock`; OutputDirBusy
    when another run holds it) and returns the directory; the other ranks share it: None."""
    from aclip.distributed import launcher_ranks

    if launcher_ranks(os.environ)[0] != 0:
        return None
    lock_output_dir(cfg.train.output_dir)
    return cfg.train.output_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point: a bad config or path is refused before any model is built."""
    path, overrides = parse_args(argv)
    locked = None
    try:
        cfg = load_config(path, overrides)
        check_paths(cfg)
        locked = lock_run(cfg)  # before anything but the pre-flight's probe is written there
        check_resume(cfg)
    except (ConfigError, FileNotFoundError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        release_output_dir(locked)
        return 2
    try:
        results = run(cfg)
    # another model's checkpoint or weights that do not fit; bad shards; unreadable data; NaN/Inf
    # steps (the last good state saved); a checkpoint that is none or could run code, or that
    # could not be written (a full disk)
    except (ConfigError, WeightsError, CheckpointError, SkipLimitExceeded, LoaderStalled,
            NonFiniteLoss, CheckpointSaveError) as err:  # fmt: skip
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        release_output_dir(locked)
    return after_stop(results) if "stopped" in results else 0


if __name__ == "__main__":
    sys.exit(main())
