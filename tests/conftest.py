"""Shared test fixtures and markers."""
import os

import pytest
import torch

# Two cores: keep intra-op threads modest so multi-process tests do not oversubscribe.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requires_gpu(n: int = 1):
    """Skip unless at least ``n`` CUDA devices are visible."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(have < n, reason=f"needs {n} CUDA GPU(s), found {have}")


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT
