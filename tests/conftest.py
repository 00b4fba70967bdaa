import os

import numpy as np
import pytest

# Tests compare against PyTorch, the oracle; they never need it at run time of the library.
torch = pytest.importorskip("torch")
torch.set_default_dtype(torch.float64)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from hypothesis import settings  # noqa: E402

# A short hypothesis run in CI; HYPOTHESIS_PROFILE=slow for release checks.
settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True)
settings.register_profile("slow", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running checks (run with -m slow)")
