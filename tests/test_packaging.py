"""What `pip install` of the project gives: its own distribution name, the eval entry points as
modules and console scripts that run from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "aclip-zeroshot": "evals.zeroshot:main",
    "aclip-retrieval": "evals.retrieval:main",
    "aclip-keep-ratio": "evals.keep_ratio:main",
}


def test_distribution_is_not_named_like_the_unrelated_pypi_aclip():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "aclip-pretrain"  # "aclip" on PyPI is another project
    assert project["scripts"] == SCRIPTS


def _pip(*args: str, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "-q", *args]
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project built into a wheel from a copy of its sources (the build writes build/ and
    *.egg-info beside them) and installed into a folder of its own, not into this venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("aclip", "evals"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    # setuptools is in this venv: no build isolation, so no download
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    (wheel,) = (tmp / "dist").glob("aclip_pretrain-*.whl")
    _pip("install", "--no-deps", "--target", str(tmp / "site"), str(wheel), cwd=tmp)
    return tmp


@pytest.mark.slow
def test_wheel_holds_the_eval_entry_points(installed):
    (wheel,) = (installed / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("zeroshot", "retrieval", "keep_ratio", "common"):
        assert f"evals/{module}.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in text
    assert not any(n.startswith("tests/") for n in names)


def _run(cmd: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``cmd`` in ``cwd`` (no checkout there) with the installed folder as the only source of
    aclip and evals (the venv's editable aclip points at a checkout: shadowed here)."""
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_entry_points_run_from_any_directory(installed, tmp_path):
    site = installed / "site"
    where = _run(
        [sys.executable, "-c", "import evals, aclip; print(evals.__file__)"], site, tmp_path
    )
    assert where.stdout.strip() == str(site / "evals" / "__init__.py")
    module = _run([sys.executable, "-m", "evals.zeroshot", "--help"], site, tmp_path)
    assert module.returncode == 0 and "--checkpoint" in module.stdout
    script = _run([str(site / "bin" / "aclip-retrieval"), "--help"], site, tmp_path)
    assert script.returncode == 0 and "--karpathy-json" in script.stdout
    # the study trains with the checkout's train.py, which an installed copy does not hold
    study = _run([str(site / "bin" / "aclip-keep-ratio"), "study", "--out", "s"], site, tmp_path)
    assert study.returncode == 2
    assert study.stderr.strip().endswith("run it from a checkout of the repository "
                                         "(or an editable install, pip install -e .)")  # fmt: skip


@pytest.mark.slow
def test_wheel_holds_the_segmentation_class_lists(installed, tmp_path):
    """The benchmarks' class-name lists are text files read at import: the wheel ships them and
    an installed copy (no checkout) reads them."""
    (wheel,) = (installed / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("voc21.clearclip.txt", "voc21.cliper.txt", "voc21.sclip.txt", "README.md"):
        assert f"aclip/data/sets/classnames/{name}" in names
    code = (
        "from aclip.data.sets.segmentation import SETS; "
        "from aclip.dense.settings import resolve_classnames; "
        "print(len(SETS['ade20k'].classnames), "
        "resolve_classnames('cliper', 'voc21', SETS['voc21'].classnames, 0)[15][0])"
    )
    out = _run([sys.executable, "-c", code], installed / "site", tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "150 person with clothes, people, human"
