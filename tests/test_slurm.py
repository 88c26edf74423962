"""launch/yfcc15m.sh on a real single-node SLURM cluster: 2 tasks train and checkpoint; preemption.

These tests submit the launch script with ``sbatch`` (a tiny CPU config, 2 tasks on one node) and
watch the job through ``scontrol`` and its log. They need a running cluster:
``bash tests/slurm/start_slurm.sh`` (root; installs slurm-wlm and munge from Debian when missing)
starts one, and ``.ci/run`` does that before ``pytest -m slurm tests/test_slurm.py``. Without
``sbatch`` or without a responding cluster they skip (they fail instead when ACLIP_REQUIRE_SLURM=1,
as in ``.ci/run``); ``make test`` deselects them (``-m "not slurm"``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import TINY_MODEL_ARGS

from aclip.data.synthetic import write_synthetic

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
LAUNCH = "launch/yfcc15m.sh"
TINY_CONFIG = "tests/slurm/tiny_cpu.yaml"
JOB_NAME = "aclip-slurm-test"
# a CPU node: the script's 8 nodes x 8 GPUs x 10 CPUs become 1 node, 2 tasks, 1 CPU each, no GPU
RESOURCES = [
    "--nodes=1",
    "--ntasks-per-node=2",
    "--cpus-per-task=1",
    "--gpus-per-node=0",
    "--time=10",
]
DONE_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED",
}  # fmt: skip
# variables of an enclosing job or launcher that must not leak into the submitted job
LEAKY = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None when a cluster answers with a usable node."""
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (start a cluster with tests/slurm/start_slurm.sh)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        nodes = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM does not answer: {err}"
    if "UP" not in ping.stdout:
        return f"slurmctld is not up: {ping.stdout.strip()} {ping.stderr.strip()}"
    states = nodes.stdout.split()
    if not any(s.rstrip("*") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no usable SLURM node (states: {states})"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    """Skip the module unless a SLURM cluster is up on this machine (fail if it is required)."""
    problem = _cluster_problem()
    if problem and os.environ.get("ACLIP_REQUIRE_SLURM") == "1":
        pytest.fail(f"ACLIP_REQUIRE_SLURM=1 but {problem}")
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def shards(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Eight shards of 50 synthetic samples; the brace pattern train.py expands."""
    root = tmp_path_factory.mktemp("slurm_data")
    write_synthetic(
        root, n_train=400, n_eval_cls=0, n_eval_ret=0, image_size=48, samples_per_shard=50, seed=0
    )
    return f"{root}/train/{{00000..00007}}.tar"


class Job:
    """One submission of the launch script: its id, log, run directory, and a way to watch it."""

    def __init__(self, job_id: str, log: Path, run_dir: Path) -> None:
        self.id, self.log, self.run_dir = job_id, log, run_dir

    def info(self) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, NumTasks, ...)."""
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", self.id], capture_output=True, text=True, timeout=20
        ).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def text(self) -> str:
        """The job's log so far (empty before slurm opens it)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, n: int = 60) -> str:
        """The last ``n`` log lines and the job record, for failure messages."""
        lines = self.text().splitlines()[-n:]
        return f"--- job {self.id}: {self.info()}\n--- {self.log} (tail):\n" + "\n".join(lines)

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float) -> None:
        """Poll ``cond`` every half second; fail with the log tail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tail()}")
            time.sleep(0.5)

    def wait_done(self, timeout: float) -> dict[str, str]:
        """Wait until the job has left the queue for good; returns its final record."""
        self.wait_for("the job to end", lambda: self.info().get("JobState") in DONE_STATES, timeout)
        return self.info()


@pytest.fixture
def submit(tmp_path: Path, shards: str) -> Iterator[Callable[..., Job]]:
    """``submit(*overrides)``: sbatch the launch script from the repository root with 2 CPU tasks.

    The config comes through $CONFIG, shards and output directory through $OVERRIDES, the tiny
    model and the rest as script arguments, so all three ways of passing settings are exercised.
    Jobs still queued or running at the end of the test are cancelled.
    """
    jobs: list[Job] = []

    def _submit(*overrides: str) -> Job:
        run_dir, logs = tmp_path / "run", tmp_path / "logs"
        logs.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LEAKY}
        env.update(
            CONFIG=TINY_CONFIG,
            OVERRIDES=f"data.train_shards={shards} train.output_dir={run_dir}",
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore::FutureWarning",
        )
        cmd = ["sbatch", "--parsable", f"--job-name={JOB_NAME}", f"--output={logs}/%x-%j.out",
               *RESOURCES, LAUNCH, *TINY_MODEL_ARGS, *overrides]  # fmt: skip
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"sbatch failed: {out.stderr}"
        job_id = out.stdout.strip().split(";")[0]
        job = Job(job_id, logs / f"{JOB_NAME}-{job_id}.out", run_dir)
        jobs.append(job)
        return job

    yield _submit
    for job in jobs:
        if job.info().get("JobState") not in DONE_STATES:
            subprocess.run(["scancel", job.id], check=False, timeout=20)


def _checkpoint_ranks(tag_dir: Path) -> list[str]:
    """The ranks that wrote ZeRO optimizer shards into a checkpoint tag directory."""
    return sorted(re.findall(r"zero_pp_rank_(\d+)_", " ".join(p.name for p in tag_dir.iterdir())))


def test_sbatch_two_tasks_train_with_world_size_2_and_checkpoint(
    submit: Callable[..., Job],
) -> None:
    """The launch script as submitted by sbatch: 2 ranks, a checkpoint, exit 0."""
    job = submit("train.stop_at_step=20", "train.ckpt_every=10")
    final = job.wait_done(timeout=240)
    log = job.text()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", job.tail()
    assert final["NumTasks"] == "2", final
    assert re.search(r"1 nodes, 2 tasks, 1 cpus/task, master \S+:\d+", log), job.tail()
    assert re.search(r"world size 2\b", log), job.tail()

    ckpts = job.run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000020"
    for step in (10, 20):
        tag = ckpts / f"step_{step:08d}"
        assert (tag / "mp_rank_00_model_states.pt").is_file(), sorted(ckpts.iterdir())
        assert _checkpoint_ranks(tag) == ["0", "1"]  # ZeRO-1 shards the optimizer over 2 ranks
    assert json.loads((job.run_dir / "results.json").read_text())["step"] == 20


def test_preempted_job_checkpoints_requeues_and_resumes_at_the_same_step(
    submit: Callable[..., Job],
) -> None:
    """SIGUSR1 to the running tasks (as --signal=USR1@180 sends it before the time limit):
    checkpoint, requeue, and the restarted job resumes at the checkpoint's step and finishes."""
    max_steps = 120
    job = submit(f"train.stop_at_step={max_steps}", "train.log_every=5")

    def progressed() -> bool:
        steps = [int(s) for s in re.findall(r"^step (\d+)", job.text(), re.MULTILINE)]
        if job.info().get("JobState") in DONE_STATES:
            pytest.fail(f"the job ended before it was signalled\n{job.tail()}")
        return bool(steps) and max(steps) >= 10

    job.wait_for("training to pass step 10", progressed, timeout=180)
    seen = max(int(s) for s in re.findall(r"^step (\d+)", job.text(), re.MULTILINE))
    assert seen < max_steps, f"training finished before the signal could be sent\n{job.tail()}"
    signal = subprocess.run(
        ["scancel", "--signal=USR1", job.id], capture_output=True, text=True, timeout=20
    )
    assert signal.returncode == 0, signal.stderr

    job.wait_for("the requeue", lambda: int(job.info().get("Restarts", 0)) >= 1, timeout=120)
    final = job.wait_done(timeout=240)
    log = job.text()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", job.tail()
    assert final["Restarts"] == "1", job.tail()

    preempted = re.findall(r"preempted at step (\d+)\b.*: checkpoint saved", log)
    assert len(preempted) == 1, job.tail()
    step = int(preempted[0])
    assert seen <= step < max_steps, (seen, step)
    assert f"requeueing job {job.id}" in log, job.tail()
    resumed = re.findall(r"resumed at step (\d+)", log)
    assert resumed == [str(step)], job.tail()
    assert log.index("preempted at step") < log.index("requeueing job") < log.index("resumed at")
    assert "(restart 1)" in log  # the script ran again in the same job, appending to its log

    ckpts = job.run_dir / "checkpoints"
    assert _checkpoint_ranks(ckpts / f"step_{step:08d}") == ["0", "1"]
    assert (ckpts / "latest").read_text().strip() == f"step_{max_steps:08d}"
    assert json.loads((job.run_dir / "results.json").read_text())["step"] == max_steps


def test_sigterm_to_every_task_process_checkpoints_and_a_new_job_resumes(
    submit: Callable[..., Job],
) -> None:
    """``scancel --signal=TERM``: every process of the job's step, both ranks and their loader
    workers, gets SIGTERM (as at the time limit and in slurm's preemption). Every rank
    checkpoints at the same step and the job ends with exit code 3 (SIGTERM does not requeue: a
    scancel means stop; slurm's own preemption requeues by itself); a new job with the same
    output directory resumes at that step and finishes. (``--full`` would also signal srun,
    which slurm's srun answers by SIGKILLing its tasks: see README, "Stop signals".)"""
    max_steps = 400
    job = submit(f"train.stop_at_step={max_steps}", "train.log_every=5", "data.workers=1")

    def progressed() -> bool:
        if job.info().get("JobState") in DONE_STATES:
            pytest.fail(f"the job ended before it was signalled\n{job.tail()}")
        return max(map(int, re.findall(r"^step (\d+)", job.text(), re.MULTILINE)), default=0) >= 10

    job.wait_for("training to pass step 10", progressed, timeout=180)
    signal = subprocess.run(
        ["scancel", "--signal=TERM", job.id], capture_output=True, text=True, timeout=20
    )
    assert signal.returncode == 0, signal.stderr
    final = job.wait_done(timeout=180)
    log = job.text()
    assert final["ExitCode"] == "3:0" and final["Restarts"] == "0", job.tail()
    assert "killed by signal" not in log and "requeueing job" not in log, job.tail()
    preempted = re.findall(r"preempted at step (\d+) \(SIGTERM\): checkpoint saved", log)
    assert len(preempted) == 1, job.tail()
    step = int(preempted[0])
    assert step < max_steps
    ckpts = job.run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{step:08d}"
    assert _checkpoint_ranks(ckpts / f"step_{step:08d}") == ["0", "1"]

    again = submit(f"train.stop_at_step={step + 5}", "train.log_every=5", "data.workers=1")
    final = again.wait_done(timeout=240)
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", again.tail()
    assert re.findall(r"resumed at step (\d+)", again.text()) == [str(step)], again.tail()
    assert json.loads((job.run_dir / "results.json").read_text())["step"] == step + 5
