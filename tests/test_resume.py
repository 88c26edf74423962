"""Exact resume, stop signals and whole-or-invisible checkpoints, on real shards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL_ARGS, tiny_config

from aclip.data.synthetic import write_synthetic
from aclip.interop import run as run_reader
from aclip.train import checkpoint_files as ckpt_files
from aclip.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_data")
    write_synthetic(
        root, n_train=64, n_eval_cls=0, n_eval_ret=0, image_size=48, samples_per_shard=32, seed=0
    )
    return root


def _cfg(out: Path, shards: Path, **extra: object):
    over = {
        "data.train_shards": f"{shards}/train/{{00000..00001}}.tar",
        "data.samples_per_epoch": 64,
        "data.shuffle_buffer": 16,
        "train.stop_at_step": 9,
        "train.ckpt_every": 3,
        "train.signal_check_every": 1,
        "optim.epochs": 2,
    }
    return tiny_config(str(out), **(over | extra))


def _recording(trainer: Trainer, losses: dict[int, float], stop_at: int | None = None) -> None:
    """Record each step's loss; send ourselves SIGUSR1 right after step ``stop_at``."""
    step = trainer.train_step

    def wrapped(batch: dict) -> dict:
        out = step(batch)
        losses[trainer.step] = out["loss"].item()
        if trainer.step == stop_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    trainer.train_step = wrapped  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("workers", "resampled"),
    [(2, True), (2, False), (0, True)],
    ids=["2w-resampled", "2w-epochs", "0w"],
)
def test_resume_after_a_stop_signal_gives_the_uninterrupted_losses(
    tmp_path, shards, dist_info, workers, resampled
):
    """Stopped by SIGUSR1 after step 5 (between periodic checkpoints 3 and 6), resumed: steps
    6-9 have the uninterrupted run's losses exactly (no sample or random draw replayed)."""
    extra = {"data.workers": workers, "data.resampled": resampled}
    whole: dict[int, float] = {}
    ref = Trainer(_cfg(tmp_path / "ref", shards, **extra), dist_info)
    _recording(ref, whole)
    assert ref.fit() is True
    assert sorted(whole) == list(range(1, 10))

    first: dict[int, float] = {}
    stopped = Trainer(_cfg(tmp_path / "run", shards, **extra), dist_info)
    _recording(stopped, first, stop_at=5)
    assert stopped.fit() is False
    assert stopped.stop_signal == signal.SIGUSR1 and stopped.step == 5
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000005"

    rest: dict[int, float] = {}
    resumed = Trainer(_cfg(tmp_path / "run", shards, **extra), dist_info)
    assert resumed.resume("latest") and resumed.step == 5
    _recording(resumed, rest)
    assert resumed.fit() is True
    for trainer in (ref, stopped, resumed):  # _recording made cycles: end the workers now
        trainer.close()
    assert first == {k: whole[k] for k in range(1, 6)}
    assert rest == {k: whole[k] for k in range(6, 10)}  # bit-exact


def _save_at(trainer: Trainer, steps: list[int], batch_seed: int = 0) -> None:
    from helpers import fake_batch

    for target in steps:
        while trainer.step < target:
            trainer.train_step(fake_batch(trainer.cfg, 8, seed=batch_seed + trainer.step))
        trainer.save_checkpoint()


def _weights(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_a_damaged_checkpoint_is_passed_over_for_the_previous_one(tmp_path, dist_info, capsys):
    cfg = tiny_config(str(tmp_path), **{"train.keep_checkpoints": 3})
    first = Trainer(cfg, dist_info)
    _save_at(first, [2])
    at_two = _weights(first)
    _save_at(first, [4])
    states = tmp_path / "checkpoints" / "step_00000004" / run_reader.MODEL_STATES
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, fails the CRC
    states.write_bytes(bytes(data))

    second = Trainer(cfg, dist_info)
    assert second.resume("latest") and second.step == 2
    assert torch.equal(_weights(second), at_two)
    out = capsys.readouterr().out
    assert "step_00000004" in out and "CRC32" in out


def test_a_save_that_never_finished_is_invisible_and_cleaned_up(tmp_path, dist_info):
    cfg = tiny_config(str(tmp_path), **{"train.keep_checkpoints": 2})
    trainer = Trainer(cfg, dist_info)
    _save_at(trainer, [1, 2, 3])
    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "step_00000003" / ckpt_files.MANIFEST).unlink()  # as if killed before the commit
    (ckpt_dir / "latest").write_text("step_00000002")
    assert ckpt_files.choose_checkpoint(ckpt_dir) == "step_00000002"
    assert [t for t in ckpt_files.checkpoint_tags(ckpt_dir)] == ["step_00000003", "step_00000002"]

    again = Trainer(cfg, dist_info)
    assert again.resume("latest") and again.step == 2
    _save_at(again, [4], batch_seed=50)
    # the unfinished step 3 is gone; two whole checkpoints kept
    assert ckpt_files.checkpoint_tags(ckpt_dir) == ["step_00000004", "step_00000002"]
    assert all(
        ckpt_files.verify_checkpoint(ckpt_dir / t) is None
        for t in ("step_00000004", "step_00000002")
    )


# ------------------------------------------------------------- kill -9 of a real run
_TINY = [
    *TINY_MODEL_ARGS,
    "train.global_batch_size=8",
    "train.precision=fp32",
    "train.zero_stage=1",
    "train.log_every=1",
    "train.image_log_every=0",
    "train.ckpt_every=3",
    "train.progress=false",
    "train.stop_at_step=14",
    "train.resume=latest",
    "optim.total_steps=14",
    "data.workers=1",
    "data.shuffle_buffer=16",
    "optim.epochs=2",
]
# A train.py whose commit step waits at step 6 (files written, manifest not yet): the moment to
# kill it mid-save.
_SLOW_COMMIT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import aclip.train.checkpoint as ck
commit = ck.commit_checkpoint
def slow(ckpt_dir, tag):
    if tag == "step_00000006":
        Path({marker!r}).write_text("saving")
        time.sleep(600)
    commit(ckpt_dir, tag)
ck.commit_checkpoint = slow
import train
sys.exit(train.main(sys.argv[1:]))
"""


def _start(script: str, args: list[str], log: Path, new_group: bool = False) -> subprocess.Popen:
    """train.py in a subprocess writing to ``log``; ``new_group``: in a process group of its own
    (with its loader workers), to be signalled as a whole."""
    rank_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in rank_vars}  # this process's group
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "a") as out:
        return subprocess.Popen(
            [sys.executable, "-c", script, *args], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=new_group,
        )  # fmt: skip


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"ended with {proc.returncode}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _args(shards: Path, out: Path) -> list[str]:
    return [
        "--config", "configs/demo.yaml", *_TINY, f"train.output_dir={out}",
        f"data.train_shards={shards}/train/{{00000..00001}}.tar", "eval.zeroshot_sets=[]",
        "eval.retrieval_sets=[]",
    ]  # fmt: skip


_PLAIN = "import sys; import train; sys.exit(train.main(sys.argv[1:]))"


def _finish(shards: Path, out: Path, log: Path, *extra: str) -> str:
    """Start train.py again (train.resume=latest) and let it finish; return its output."""
    proc = _start(_PLAIN, [*_args(shards, out), *extra], log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    return log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["mid-run", "mid-save"])
def test_kill_9_then_the_next_start_resumes_from_the_last_whole_checkpoint(
    tmp_path, shards, moment
):
    out, log, marker = tmp_path / "run", tmp_path / "log.txt", tmp_path / "saving"
    ckpt_dir = out / "checkpoints"
    script = _SLOW_COMMIT.format(root=str(ROOT), marker=str(marker))
    proc = _start(script, _args(shards, out), log)
    if moment == "mid-run":  # between checkpoints: after step 4, before the save at 6
        _wait_for(lambda: "step 4/14" in log.read_text(), proc, log)
    else:
        _wait_for(marker.exists, proc, log)
    proc.kill()
    proc.wait()
    assert (ckpt_dir / "latest").read_text() == "step_00000003"
    if moment == "mid-save":
        assert (ckpt_dir / "step_00000006").is_dir()
        assert not (ckpt_dir / "step_00000006" / ckpt_files.MANIFEST).exists()

    text = _finish(shards, out, log)
    assert "resumed at step 3" in text
    assert json.loads((out / "results.json").read_text())["step"] == 14
    assert (ckpt_dir / "latest").read_text() == "step_00000014"
    for tag in ckpt_files.checkpoint_tags(ckpt_dir):  # everything left is whole
        assert ckpt_files.verify_checkpoint(ckpt_dir / tag) is None, tag


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "workers"),
    [(signal.SIGTERM, 0), (signal.SIGTERM, 2), (signal.SIGINT, 2)],
    ids=["TERM-0w", "TERM-2w", "INT-2w"],
)
def test_a_stop_signal_to_the_whole_process_group_checkpoints_and_resumes(
    tmp_path, shards, sig, workers
):
    """``kill -TERM -- -PGID`` (timeout, schedulers, scancel) reaches the loader workers too:
    they leave it to the main process, which saves at the step boundary and exits 3; the next
    start resumes at that step. Ctrl-C (SIGINT to the group) does the same."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    run_long = [f"data.workers={workers}", "train.stop_at_step=100000", "optim.total_steps=100000",
                "train.ckpt_every=0", "train.signal_check_every=1"]  # fmt: skip
    proc = _start(_PLAIN, [*_args(shards, out), *run_long], log, new_group=True)
    _wait_for(lambda: "step 3/" in log.read_text(), proc, log)
    os.killpg(proc.pid, sig)
    assert proc.wait(timeout=120) == 3, log.read_text()[-3000:]
    text = log.read_text()
    stopped = re.findall(rf"preempted at step (\d+) \({sig.name}\): checkpoint saved", text)
    assert len(stopped) == 1, text[-3000:]
    assert "killed by signal" not in text and "Traceback" not in text, text[-3000:]
    step = int(stopped[0])
    assert (out / "checkpoints" / "latest").read_text() == f"step_{step:08d}"

    text = _finish(shards, out, log, f"data.workers={workers}", f"train.stop_at_step={step + 2}",
                   "optim.total_steps=100000")  # fmt: skip
    assert f"resumed at step {step}" in text
    assert json.loads((out / "results.json").read_text())["step"] == step + 2


# a SIGTERM while the stopped run closes, as srun --kill-on-bad-exit sends to the ranks still
# closing once the first has exited with the stop code
_TERM_WHILE_CLOSING = """
import os, signal, sys
import train
from aclip.train.trainer import Trainer
close = Trainer.close
def term_then_close(self):
    os.kill(os.getpid(), signal.SIGTERM)
    close(self)
Trainer.close = term_then_close
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_second_sigterm_while_closing_after_a_stop_keeps_the_stop_code(tmp_path, shards):
    """After a stop signal and its checkpoint, a SIGTERM during close() is ignored: the run
    exits 3 (it died with -15 / 143 before: a SLURM rank was cut short this way under load)."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    run_long = ["data.workers=0", "train.stop_at_step=100000", "optim.total_steps=100000",
                "train.ckpt_every=0", "train.signal_check_every=1"]  # fmt: skip
    proc = _start(_TERM_WHILE_CLOSING, [*_args(shards, out), *run_long], log)
    _wait_for(lambda: "step 3/" in log.read_text(), proc, log)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 3, log.read_text()[-3000:]
    assert "preempted at step" in log.read_text()


def _save_one_rank(rank: int, port: int, out: str) -> None:
    from helpers import fake_batch, set_rank_env

    from aclip.distributed import init_distributed

    set_rank_env(0, 1, port)
    trainer = Trainer(tiny_config(out), init_distributed())
    for i in range(2):
        trainer.train_step(fake_batch(trainer.cfg, 8, seed=i))
    trainer.save_checkpoint()
    torch.save([p.detach().clone() for p in trainer.model.parameters()], Path(out, "saved.pt"))


def _resume_two_ranks(rank: int, port: int, out: str) -> None:
    from helpers import fake_batch, rank_slice, set_rank_env

    from aclip.distributed import init_distributed

    set_rank_env(rank, 2, port)
    trainer = Trainer(tiny_config(out), init_distributed())
    assert trainer.resume("latest") and trainer.step == 2
    saved = torch.load(Path(out, "saved.pt"))
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), saved, strict=True))
    trainer.train_step(rank_slice(fake_batch(trainer.cfg, 8, seed=2), rank, 2))
    assert trainer.step == 3
    Path(out, f"rank{rank}.done").write_text("ok")


@pytest.mark.slow
def test_a_one_rank_zero0_checkpoint_resumes_on_two_ranks(tmp_path):
    """The one-rank fast path (ZeRO 0, no gradient all-reduce) writes an ordinary ZeRO-0
    checkpoint, whose optimizer state is whole: two ranks resume it (weights and step) and go on.
    (A ZeRO 1/2 checkpoint partitions its optimizer state by world size: DeepSpeed refuses it on
    another world size, see the README.)"""
    import torch.multiprocessing as mp
    from helpers import free_port

    mp.spawn(_save_one_rank, args=(free_port(), str(tmp_path)), nprocs=1)
    mp.spawn(_resume_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2)
    assert (tmp_path / "rank0.done").is_file() and (tmp_path / "rank1.done").is_file()
