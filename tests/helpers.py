"""Shared helpers for the tests: PyTorch conversion and the relative-error measure."""
import numpy as np
import torch

# Tolerances used throughout (relative error as defined by rel_err below).
TOL64 = 1e-10
TOL32 = 1e-5


def t(a, requires_grad=False):
    """NumPy -> torch tensor with the same dtype."""
    out = torch.from_numpy(np.ascontiguousarray(a))
    return out.requires_grad_(requires_grad) if requires_grad else out


def n(tensor):
    return tensor.detach().cpu().numpy()


def rel_err(a, b):
    """max|a - b| / max(max|b|, tiny): the relative error of a whole array against a reference b."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(b))), 1e-30)
    return float(np.max(np.abs(a - b)) / scale)
