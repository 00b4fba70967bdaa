"""Launch shapes shared by the Numba-CUDA kernels (kernels/cuda_*.py); no NumPy counterpart.

Every elementwise kernel here walks its index space with a grid-stride loop, so any grid covers any
size: on a GPU the grid is ceil(n / 256) blocks of 256 threads (capped); under Numba's CUDA simulator,
where every thread is a Python thread and the launch cost grows with the thread count, one block of
8 threads, so the tests stay fast.
"""
from numba import config as _config


def simulated():
    """True when kernels run in Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1)."""
    return bool(_config.ENABLE_CUDASIM)


def threads_1d():
    return 8 if simulated() else 256


def grid_1d(n):
    """(blocks, threads) for a grid-stride loop over n items."""
    t = threads_1d()
    cap = 1 if simulated() else 8192
    return max(1, min(cap, (int(n) + t - 1) // t)), t


def reduce_threads():
    """Threads per block of the tree reductions (a power of two)."""
    return 8 if simulated() else 256
