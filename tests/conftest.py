"""Shared test settings: CPU only, deterministic, quiet DeepSpeed."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def dist_info():
    """This process as rank 0 of a 1-rank gloo group (set up once; DeepSpeed's CPU accelerator)."""
    from aclip.distributed import init_distributed

    return init_distributed()
