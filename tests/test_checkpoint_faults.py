"""Checkpoints under faults: manifests of the wrong shape, every checkpoint damaged, pruning next
to a damaged checkpoint, a full disk mid-save, two runs on one output directory, and
``train.resume`` naming a missing or damaged directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_MODEL_ARGS, tiny_config

import train
from aclip.config import ConfigError
from aclip.data.synthetic import write_synthetic
from aclip.distributed import single_process_env
from aclip.interop import run as run_reader
from aclip.train import checkpoint as ckpt
from aclip.train import checkpoint_files as ckpt_files
from aclip.train.runlock import LOCK_FILE, OutputDirBusy, lock_output_dir, release_output_dir
from aclip.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
STEP2, STEP4 = "step_00000002", "step_00000004"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults_data")
    write_synthetic(
        root, n_train=64, n_eval_cls=0, n_eval_ret=0, image_size=48, samples_per_shard=32, seed=0
    )
    return root


def _save_at(trainer: Trainer, steps: list[int]) -> None:
    from helpers import fake_batch

    for target in steps:
        while trainer.step < target:
            trainer.train_step(fake_batch(trainer.cfg, 8, seed=trainer.step))
        trainer.save_checkpoint()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, dist_info) -> Path:
    """A run directory with two whole checkpoints, steps 2 and 4 (``latest`` names step 4)."""
    out = tmp_path_factory.mktemp("faults_run") / "run"
    trainer = Trainer(tiny_config(str(out), **{"train.keep_checkpoints": 3}), dist_info)
    _save_at(trainer, [2, 4])
    trainer.close()
    return out


@pytest.fixture
def run_copy(saved_run, tmp_path) -> Path:
    """A copy of :func:`saved_run` to damage."""
    return Path(shutil.copytree(saved_run, tmp_path / "run"))


def _flip_a_byte(tag_dir: Path) -> None:
    """Damage the model states: same size, one byte flipped (fails the CRC32 only)."""
    states = tag_dir / run_reader.MODEL_STATES
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    states.write_bytes(bytes(data))


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", "configs/demo.yaml", *TINY_MODEL_ARGS, "train.global_batch_size=8",
        "train.precision=fp32", "train.zero_stage=0", "train.progress=false",
        "train.image_log_every=0", "train.ckpt_every=0", "train.stop_at_step=1",
        "data.workers=0", "data.shuffle_buffer=16", "data.samples_per_epoch=64",
        f"train.output_dir={out}", f"data.train_shards={shards}/train/{{00000..00001}}.tar",
        "eval.zeroshot_sets=[]", "eval.retrieval_sets=[]", *extra,
    ]  # fmt: skip


# ------------------------------------------------------------- manifests of the wrong shape
_STATES = run_reader.MODEL_STATES
BAD_MANIFESTS = {
    "list": [],
    "null": None,
    "string": "files",
    "no files key": {"tag": STEP4},
    "files a list": {"files": [_STATES]},
    "files empty": {"files": {}},
    "entry without size": {"files": {_STATES: {"crc32": 1}}},
    "entry not a dict": {"files": {_STATES: 7}},
    "size a string": {"files": {_STATES: {"size": "7", "crc32": 1}}},
    "crc a bool": {"files": {_STATES: {"size": 7, "crc32": True}}},
    "no model states": {"files": {"rank_00000.pt": {"size": 7, "crc32": 1}}},
    "path outside": {
        "files": {_STATES: {"size": 7, "crc32": 1}, "../../x": {"size": 1, "crc32": 1}}
    },
}


@pytest.mark.parametrize("manifest", list(BAD_MANIFESTS.values()), ids=list(BAD_MANIFESTS))
def test_a_manifest_of_the_wrong_shape_is_a_problem_and_passed_over(run_copy, manifest):
    """Valid JSON of the wrong shape made verify_checkpoint raise TypeError/KeyError (``[]``,
    ``null``, an entry without ``size``) or pass (``{"files": {}}``: nothing to check); now it
    is a problem like any damage, and the previous checkpoint is chosen."""
    ckpt_dir = run_copy / "checkpoints"
    (ckpt_dir / STEP4 / ckpt_files.MANIFEST).write_text(json.dumps(manifest))
    problem = ckpt_files.verify_checkpoint(ckpt_dir / STEP4)
    assert problem and "manifest" in problem
    warnings: list[str] = []
    assert ckpt_files.choose_checkpoint(ckpt_dir, warnings.append) == STEP2
    assert STEP4 in warnings[0]


def test_the_manifest_commit_writes_has_the_checked_shape(saved_run):
    manifest = json.loads((saved_run / "checkpoints" / STEP4 / ckpt_files.MANIFEST).read_text())
    assert ckpt_files.manifest_problem(manifest) is None
    assert ckpt_files.verify_checkpoint(saved_run / "checkpoints" / STEP4) is None


# ------------------------------------------------------------- every checkpoint damaged
def test_every_checkpoint_damaged_refuses_resume_latest_instead_of_starting_at_step_0(
    run_copy, shards, capsys
):
    """train.py with train.resume=latest and both checkpoints failing their CRC32 exits 2 in
    the pre-flight naming both and the way out (it trained from step 0 and exited 0)."""
    for tag in (STEP2, STEP4):
        _flip_a_byte(run_copy / "checkpoints" / tag)
    rc = train.main(_train_args(shards, run_copy, "train.resume=latest"))
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert STEP2 in err and STEP4 in err and "fails its CRC32 check" in err
    assert "move them aside" in err
    assert not (run_copy / "results.json").exists()  # nothing trained
    assert (run_copy / "checkpoints" / "latest").read_text() == STEP4  # nothing touched


def test_every_checkpoint_damaged_stops_the_trainer_too(run_copy, dist_info):
    """Past a size-only pre-flight (several ranks), rank 0's CRC32 check in the trainer stops
    every rank alike with the same message (it returned False: a fresh start)."""
    cfg = tiny_config(str(run_copy))
    for tag in (STEP2, STEP4):
        _flip_a_byte(run_copy / "checkpoints" / tag)
    ckpt.check_resume(cfg, crc=False)  # the sizes are right
    trainer = Trainer(cfg, dist_info)
    with pytest.raises(ConfigError, match="none of the 2 checkpoints") as err:
        trainer.resume("latest")
    assert "fails its CRC32 check" in str(err.value)
    trainer.close()


# ------------------------------------------------------------- pruning
def test_pruning_keeps_a_good_checkpoint_rather_than_a_damaged_newer_one(run_copy, capsys):
    """keep=1 with the newer checkpoint damaged: the good older one is kept (it was deleted,
    leaving only the damaged one)."""
    ckpt_dir = run_copy / "checkpoints"
    _flip_a_byte(ckpt_dir / STEP4)
    assert ckpt_files.prune_checkpoints(ckpt_dir, keep=1) == []
    assert ckpt_files.checkpoint_tags(ckpt_dir) == [STEP4, STEP2]
    assert ckpt_files.verify_checkpoint(ckpt_dir / STEP2) is None
    out = capsys.readouterr().out
    assert "damaged" in out and STEP4 in out


def test_a_save_next_to_a_damaged_checkpoint_keeps_the_good_ones(run_copy, dist_info):
    """Resumed from step 2 past a damaged step 4 and saved at 3 with keep=2: steps 3 and 2 (both
    good) are kept (step 2 was deleted for the damaged step 4). Once 2 newer good ones exist
    the damaged one goes too."""
    ckpt_dir = run_copy / "checkpoints"
    _flip_a_byte(ckpt_dir / STEP4)
    trainer = Trainer(tiny_config(str(run_copy), **{"train.keep_checkpoints": 2}), dist_info)
    assert trainer.resume("latest") and trainer.step == 2
    _save_at(trainer, [3])
    assert ckpt_files.checkpoint_tags(ckpt_dir) == [STEP4, "step_00000003", STEP2]
    _save_at(trainer, [4, 5])  # step 4 rewritten whole; 5 and 4 kept
    trainer.close()
    assert ckpt_files.checkpoint_tags(ckpt_dir) == ["step_00000005", STEP4]
    assert all(
        ckpt_files.verify_checkpoint(ckpt_dir / t) is None
        for t in ckpt_files.checkpoint_tags(ckpt_dir)
    )


def test_pruning_reads_a_checkpoint_once(run_copy, monkeypatch):
    """The CRC32s of a checkpoint are read once per process (a save prunes every time)."""
    ckpt_dir = run_copy / "checkpoints"
    reads: list[Path] = []
    digest = ckpt_files._file_digest
    monkeypatch.setattr(
        ckpt_files, "_file_digest", lambda p, sync=False: reads.append(p) or digest(p)
    )
    ckpt_files.prune_checkpoints(ckpt_dir, keep=2)
    assert reads  # the copies are new to this process: read once
    reads.clear()
    ckpt_files.prune_checkpoints(ckpt_dir, keep=2)
    assert reads == []
    _flip_a_byte(ckpt_dir / STEP2)  # a file rewritten since is read again
    assert ckpt_files.prune_checkpoints(ckpt_dir, keep=2, log=lambda _: None) == []
    assert {p.parent.name for p in reads} == {STEP2} and reads[-1].name == run_reader.MODEL_STATES


# ------------------------------------------------------------- a full disk
def _fill_rank_file(monkeypatch, rank: int = 0) -> None:
    """After DeepSpeed wrote its files, link ``rank``'s rank file to /dev/full: writing it fails
    with the OS's ENOSPC (no space left on device), as on a disk that just filled up."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    save = DeepSpeedEngine.save_checkpoint

    def save_then_fill(self, save_dir, tag=None, **kwargs):
        out = save(self, save_dir, tag=tag, **kwargs)
        (Path(save_dir) / tag / f"rank_{rank:05d}.pt").symlink_to("/dev/full")
        return out

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", save_then_fill)


def _fill_model_states(trainer: Trainer, monkeypatch) -> None:
    """Link DeepSpeed's model-states file to /dev/full before it is written (ENOSPC)."""
    engine = trainer.engine.checkpoint_engine
    save = engine.save

    def full_then_save(state_dict, path):
        if Path(path).name == run_reader.MODEL_STATES:
            Path(path).symlink_to("/dev/full")
        return save(state_dict, path)

    monkeypatch.setattr(engine, "save", full_then_save)
    # DeepSpeed's torch.save to a path loses the OSError in C++ ("unexpected pos ..."): the
    # save then probes the disk with a write beside the checkpoints, which a full disk refuses
    (trainer.run_dir / "checkpoints" / f".aclip_write_probe{os.getpid()}").symlink_to("/dev/full")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("which", ["rank file", "model states"])
def test_a_full_disk_mid_save_says_so_and_leaves_the_previous_checkpoint(
    tmp_path, dist_info, monkeypatch, which
):
    """ENOSPC writing the rank file (torch's zip writer raised "unexpected pos ...") or
    DeepSpeed's model states: CheckpointSaveError "no space left on device" naming the step
    directory, which is removed; ``latest`` still names the previous checkpoint."""
    trainer = Trainer(tiny_config(str(tmp_path)), dist_info)
    _save_at(trainer, [2])
    if which == "rank file":
        _fill_rank_file(monkeypatch)
    else:
        _fill_model_states(trainer, monkeypatch)
    with pytest.raises(OSError, match="no space left on device") as err:
        _save_at(trainer, [3])
    trainer.close()
    ckpt_dir = tmp_path / "checkpoints"
    assert isinstance(err.value, ckpt.CheckpointSaveError)
    assert f"{ckpt_dir / 'step_00000003'}" in str(err.value)
    assert "latest still names step_00000002" in str(err.value)
    assert ckpt_files.checkpoint_tags(ckpt_dir) == [STEP2]  # step 3's directory is gone
    assert (ckpt_dir / "latest").read_text() == STEP2
    assert ckpt_files.choose_checkpoint(ckpt_dir) == STEP2


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_train_py_exits_2_on_a_full_disk(tmp_path, shards, monkeypatch, capsys):
    _fill_rank_file(monkeypatch)
    assert train.main(_train_args(shards, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "error: cannot save checkpoint" in err and "no space left on device" in err
    assert "rank_00000.pt" in err
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


# ------------------------------------------------------------- one run per output directory
_HOLD = """
import sys, time
from aclip.train.runlock import lock_output_dir
lock_output_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def _python(code: str, *args: str, **popen) -> subprocess.Popen:
    env = single_process_env(os.environ) | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True,
                            **popen)  # fmt: skip


def test_a_second_train_py_on_a_locked_output_dir_exits_2_naming_the_holder(
    tmp_path, shards, capsys
):
    """A process holds the run lock of train.output_dir: train.py exits 2 in its pre-flight,
    naming that process's pid and host. Once it is gone (kill -9, as a preempted job), the lock
    is free again."""
    out = tmp_path / "run"
    holder = _python(_HOLD, str(out), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train.main(_train_args(shards, out)) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid} on host" in err and "in use by another training run" in err
        assert str(out / LOCK_FILE) in err
        assert not (out / "config.yaml").exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()
    lock_output_dir(out)  # released with the process
    release_output_dir(out)


def test_train_py_holds_the_lock_for_the_run_and_releases_it(tmp_path, shards, monkeypatch):
    """While train.py runs (its run() here starts a second train.py on the same directory),
    the second exits 2 naming the first one's pid; after main returns the lock is free."""
    out = tmp_path / "run"
    seen: dict = {}

    def second_train_py(cfg) -> dict:
        script = "import sys, train; sys.exit(train.main(sys.argv[1:]))"
        second = _python(script, *_train_args(shards, out), stderr=subprocess.PIPE)
        seen["rc"], seen["err"] = second.wait(timeout=300), second.stderr.read()
        return {"step": 0}

    monkeypatch.setattr(train, "run", second_train_py)
    assert train.main(_train_args(shards, out)) == 0
    assert seen["rc"] == 2, seen["err"][-2000:]
    assert f"pid {os.getpid()} on host" in seen["err"]
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    other = _python(_HOLD, str(out), stdout=subprocess.PIPE)  # free now: another takes it
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirBusy, match=f"pid {other.pid} "):
            lock_output_dir(out)
    finally:
        other.kill()
        other.wait()


def test_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = tiny_config(str(tmp_path / "run"))
    assert train.lock_run(cfg) is None and not (tmp_path / "run" / LOCK_FILE).exists()
    monkeypatch.setenv("RANK", "0")
    assert train.lock_run(cfg) == str(tmp_path / "run")
    release_output_dir(tmp_path / "run")


# ------------------------------------------------------------- train.resume=<directory>
def test_train_resume_naming_a_missing_directory_exits_2(tmp_path, shards, capsys):
    """It was a FileNotFoundError traceback (exit 1) after the model was built, saying "no
    manifest (the save did not finish)"."""
    missing = tmp_path / "run" / "checkpoints" / "step_00000009"
    rc = train.main(_train_args(shards, tmp_path / "run", f"train.resume={missing}"))
    err = capsys.readouterr().err
    assert rc == 2
    assert f"train.resume: {missing} does not exist" in err and "did not finish" not in err


def test_train_resume_naming_a_damaged_or_wrong_directory_exits_2(run_copy, shards, capsys):
    """A checkpoint failing its CRC32, and a run directory given for a step directory: exit 2
    in the pre-flight with what is wrong, not "the save did not finish"."""
    _flip_a_byte(run_copy / "checkpoints" / STEP4)
    tag_dir = run_copy / "checkpoints" / STEP4
    assert train.main(_train_args(shards, run_copy, f"train.resume={tag_dir}")) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {tag_dir} is not usable: {run_reader.MODEL_STATES} fails its CRC32" in err

    assert train.main(_train_args(shards, run_copy, f"train.resume={run_copy}")) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint directory" in err and "did not finish" not in err
    assert not (run_copy / "results.json").exists()


def test_train_resume_naming_a_good_directory_passes_the_preflight(saved_run):
    cfg = tiny_config(str(saved_run), **{"train.resume": f"{saved_run}/checkpoints/{STEP2}"})
    ckpt.check_resume(cfg)
    ckpt.check_resume(tiny_config(str(saved_run), **{"train.resume": "latest"}))
    # no checkpoints at all: a fresh start, as before
    ckpt.check_resume(tiny_config(str(saved_run / "none"), **{"train.resume": "latest"}))


# ------------------------------------------------------------- a full disk on one rank of two
def _save_with_rank_1_full(rank: int, port: int, out: str) -> None:
    from helpers import fake_batch, rank_slice, set_rank_env

    from aclip.distributed import init_distributed

    set_rank_env(rank, 2, port)
    trainer = Trainer(tiny_config(out, **{"train.zero_stage": 1}), init_distributed())
    step = lambda i: trainer.train_step(rank_slice(fake_batch(trainer.cfg, 8, seed=i), rank, 2))  # noqa: E731
    step(0)
    trainer.save_checkpoint()  # step 1: whole
    step(1)
    if rank == 1:
        import pytest as _pytest

        _fill_rank_file(_pytest.MonkeyPatch(), rank=1)
    try:
        trainer.save_checkpoint()  # step 2: rank 1's file fails, rank 0's is written
    except ckpt.CheckpointSaveError as err:
        Path(out, f"rank{rank}.err").write_text(str(err))
    trainer.close()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_on_one_rank_stops_every_rank_and_removes_the_save(tmp_path):
    """Rank 1's write fails, rank 0's succeeds: both raise (neither waits forever at the
    commit), rank 0 removed the half-written step directory, ``latest`` names step 1."""
    import torch.multiprocessing as mp
    from helpers import free_port

    mp.spawn(_save_with_rank_1_full, args=(free_port(), str(tmp_path)), nprocs=2)
    assert "no space left on device" in (tmp_path / "rank1.err").read_text()
    assert "another rank failed" in (tmp_path / "rank0.err").read_text()
    ckpt_dir = tmp_path / "checkpoints"
    assert ckpt_files.checkpoint_tags(ckpt_dir) == ["step_00000001"]
    assert (ckpt_dir / "latest").read_text() == "step_00000001"
