"""The layer-graph check (tools/layers.py): on the repository, and on small trees that break it."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "layers.py"

# a tree that keeps every rule: each package imports only lower ranks
CLEAN = {
    "aclip/__init__.py": "",
    "aclip/config.py": "X = 1\n",
    "aclip/model/__init__.py": "from aclip.config import X\n",
    "aclip/model/vision.py": "from aclip.model import X\n",
    "aclip/methods/__init__.py": "import aclip.model.vision\nfrom aclip import config\n",
    "aclip/export.py": "from aclip.methods import config\n",
    "evals/__init__.py": "",
    "evals/zeroshot.py": "from aclip.methods import config\nfrom evals import common\n",
    "evals/common.py": "from aclip.model import vision\n",
    "train.py": "import aclip.methods\nfrom aclip.model.vision import X\n",
}


def run_layers(root: Path) -> tuple[int, str]:
    """Run the script on ``root``: (exit status, stdout)."""
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert not proc.stderr, proc.stderr
    return proc.returncode, proc.stdout


def write_tree(root: Path, changes: dict[str, str]) -> Path:
    """The clean tree with ``changes`` (path -> text) written over it."""
    for rel, text in {**CLEAN, **changes}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def lines(count: int) -> str:
    return "".join(f"x{i} = {i}\n" for i in range(count))


def test_repository_keeps_the_layer_rules():
    status, out = run_layers(REPO)
    assert "[2] aclip.methods" in out and "[7] evals" in out  # the graph is printed
    assert status == 0, out


def test_clean_tree_passes_and_prints_the_graph_with_counts(tmp_path):
    status, out = run_layers(write_tree(tmp_path, {}))
    assert status == 0, out
    assert "[1] aclip.model (2 modules) -> aclip.config (1)" in out
    assert "[2] aclip.methods (1 modules) -> aclip.config (1), aclip.model (1)" in out
    assert "[7] aclip.export (1 modules) -> aclip.methods (1)" in out
    assert "[7] evals (3 modules) -> aclip.model (1), aclip.methods (1)" in out
    assert "[7] train (1 modules) -> aclip.model (1), aclip.methods (1)" in out
    assert "0 broken rule(s), 0 warning(s)" in out


BROKEN = {
    "upward import": (
        {"aclip/model/heads.py": "import torch\nfrom aclip.methods import Y\n"},
        "upward import: aclip/model/heads.py:2 imports aclip.methods "
        "(aclip.model, rank 1 -> aclip.methods, rank 2)",
    ),
    "relative upward import": (
        {"aclip/model/heads.py": "from ..methods import Y\n"},
        "upward import: aclip/model/heads.py:1 imports aclip.methods",
    ),
    "import inside a function": (
        {"aclip/config.py": "def load():\n    from aclip.model.vision import X\n    return X\n"},
        "upward import: aclip/config.py:2 imports aclip.model.vision",
    ),
    "same-rank import": (
        {"aclip/data/__init__.py": "from aclip.model import X\n"},
        "same-rank import: aclip/data/__init__.py:1 imports aclip.model "
        "(aclip.data -> aclip.model, rank 1)",
    ),
    "same-rank entry points": (
        {"train.py": "from evals.common import X\n"},
        "same-rank import: train.py:1 imports evals.common (train -> evals, rank 7)",
    ),
    "aclip imports evals": (
        {"aclip/methods/__init__.py": "def f():\n    import evals.zeroshot\n"},
        "aclip imports an entry point: aclip/methods/__init__.py:2 imports evals.zeroshot",
    ),
    "aclip imports the export forwarder": (
        {"aclip/methods/__init__.py": "from aclip.export import main\n"},
        "aclip imports an entry point: aclip/methods/__init__.py:1 imports aclip.export",
    ),
    "package cycle": (
        {"aclip/config.py": "def f():\n    import aclip.model\n"},
        "package cycle: aclip.config <-> aclip.model",
    ),
    "module cycle": (
        {
            "aclip/model/a.py": "from aclip.model.b import B\nA = 1\n",
            "aclip/model/b.py": "def f():\n    from aclip.model import a\nB = 1\n",
        },
        "module cycle: aclip.model.a <-> aclip.model.b",
    ),
    "module cycle through the package": (
        {"aclip/model/__init__.py": "from aclip.model.vision import Z\n"},
        "module cycle: aclip.model <-> aclip.model.vision",
    ),
    "long module": (
        {"aclip/model/big.py": lines(501)},
        "long module: aclip/model/big.py has 501 lines (> 500)",
    ),
    "long entry point": (
        {"train.py": lines(501)},
        "long module: train.py has 501 lines (> 500)",
    ),
    "long command": (
        {"evals/big.py": lines(201)},
        "long command: evals/big.py has 201 lines (> 200)",
    ),
    "unlisted package": (
        {"aclip/extra/__init__.py": ""},
        "unlisted package: aclip.extra belongs to no package of LAYERS",
    ),
    "unreadable module": (
        {"aclip/model/broken.py": "def (:\n"},
        "unreadable module: aclip.model.broken",
    ),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_each_broken_rule_fails_and_is_named(tmp_path, case):
    changes, expected = BROKEN[case]
    status, out = run_layers(write_tree(tmp_path, changes))
    assert status == 1, out
    assert f"error: {expected}" in out, out


def test_limits_are_inclusive_and_a_command_over_150_lines_only_warns(tmp_path):
    changes = {"aclip/model/big.py": lines(500), "evals/big.py": lines(151)}
    status, out = run_layers(write_tree(tmp_path, changes))
    assert status == 0, out
    assert "warning: long command: evals/big.py has 151 lines (> 150)" in out
    assert "0 broken rule(s), 1 warning(s)" in out


def test_type_checking_imports_break_layers_but_close_no_cycle(tmp_path):
    guarded = "import typing\nif typing.TYPE_CHECKING:\n    from aclip.model.a import A\n"
    cycle = {"aclip/model/a.py": "from aclip.model.b import B\n", "aclip/model/b.py": guarded}
    status, out = run_layers(write_tree(tmp_path, cycle))
    assert status == 0, out
    upward = {"aclip/config.py": guarded.replace("aclip.model.a", "aclip.methods")}
    status, out = run_layers(write_tree(tmp_path, upward))
    assert status == 1 and "error: upward import: aclip/config.py:3 imports aclip.methods" in out
    assert "cycle" not in out
