"""The numba-cuda backend against the numpy reference.

The checks themselves live in numba_cuda_check.py, a script run in a SUBPROCESS: under Numba's CUDA
simulator (NUMBA_ENABLE_CUDASIM=1 must be set before numba is imported, and would then hold for the
whole process) without a GPU, and on the real device when one is present. The rest of the test
session keeps normal numba. Tolerances (stated in the script): relative error < 1e-4 in float32,
< 1e-10 in float64, for every primitive and loss, for the fused optimizer updates against the
optimizers' array code, and for whole models' logits, loss, gradients and optimizer step. Under the
simulator the script runs in two parts (two subprocesses), each named by its sections.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

numba = pytest.importorskip("numba")
pytest.importorskip("numba.cuda")

SCRIPT = Path(__file__).with_name("numba_cuda_check.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(simulator, timeout, sections=()):
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    proc = subprocess.run([sys.executable, str(SCRIPT), *sections], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0, "numba-cuda checks failed:\n" + ("\n".join(failed) or out[-4000:])
    return out


def test_numba_cuda_kernels_under_the_simulator():
    """Every layer primitive and GEMM kernel; whole models (every architecture and loss)."""
    out = _run(simulator=True, timeout=300, sections=("kernels", "models"))
    assert "simulator=True" in out and "0 failures" in out
    assert "gemm blocked split-K + bias + relu" in out and "gemm blocked split-K A^T, NCHW B and C" in out


def test_numba_cuda_losses_optimizers_input_grad_under_the_simulator():
    """The table replaces every primitive; conv2d_backward(input_grad=False) skips the dx work; BCE and
    Dice kernels; the fused SGD / Adam / AdamW updates against unet_np.optim's array code."""
    out = _run(simulator=True, timeout=300, sections=("table", "input_grad", "losses", "optim"))
    assert "simulator=True" in out and "0 failures" in out
    for what in ("fused launches after step 3", "input_grad=False dx", "softmax_dice", "sigmoid_dice",
                 "bce_with_logits"):
        assert what in out, f"the checks of {what!r} did not run"


def _gpu_present():
    code = "from numba import cuda; print(cuda.is_available())"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return r.stdout.strip().endswith("True")


@pytest.mark.skipif(not _gpu_present(), reason="no CUDA GPU for numba")
def test_numba_cuda_kernels_on_the_gpu():
    out = _run(simulator=False, timeout=600)
    assert "simulator=False" in out and "0 failures" in out


def test_clear_error_without_gpu_or_simulator():
    """Without a GPU and without the simulator, asking for the backend names what is missing."""
    code = (
        "from numba import cuda\n"
        "from unet_np import backends\n"
        "if cuda.is_available():\n"
        "    print('GPU'); raise SystemExit\n"
        "assert 'numba-cuda' not in backends.available()\n"
        "try:\n"
        "    backends.get('numba-cuda')\n"
        "except backends.BackendUnavailable as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    if r.stdout.strip() == "GPU":
        pytest.skip("a GPU is present")
    msg = r.stdout
    assert "numba-cuda" in msg and "NUMBA_ENABLE_CUDASIM" in msg and "unet-np[numba-cuda]" in msg


def test_gemm_batched_compiles_to_registers_and_unrolled_fmas():
    """The fast GEMM's PTX for sm_90 (numba.cuda.compile_ptx needs libNVVM, not a GPU): the 8x8
    accumulators of a thread stay in registers (no local memory), and a K-step is unrolled: 8 x 8 x 8
    = 512 FMAs in straight code, the shared loads at immediate offsets. Skipped without libNVVM."""
    code = (
        "import re\n"
        "from numba import cuda, float32, int64, boolean\n"
        "from unet_np.kernels import cuda_gemm as g\n"
        "arr = float32[::1]\n"
        "sig = (arr, arr, arr) + (int64,) * 10 + (arr, boolean, boolean, int64)\n"
        "c = g.BATCHED_GPU_CONFIGS[0]\n"
        "k = g.gemm_batched_kernel('float32', c['BM'], c['BN'], c['BK'], c['TM'], c['TN'], False, True)\n"
        "try:\n"
        "    ptx, _ = cuda.compile_ptx(k.py_func, sig, cc=(9, 0))\n"
        "except Exception as exc:\n"
        "    print('SKIP', type(exc).__name__, str(exc).splitlines()[0] if str(exc) else ''); raise SystemExit\n"
        "print('fma', len(re.findall(r'\\bfma\\.rn\\.f32', ptx)))\n"
        "print('local', len(re.findall(r'\\b(ld|st)\\.local', ptx)))\n"
        "print('imm', len(re.findall(r'ld\\.shared\\.f32\\s+%f\\d+, \\[%rd\\d+\\+\\d+\\]', ptx)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    if r.stdout.startswith("SKIP"):
        pytest.skip(f"numba cannot compile PTX here: {r.stdout.strip()}")
    got = dict(line.split() for line in r.stdout.splitlines())
    assert int(got["fma"]) == 512 and int(got["local"]) == 0, got
    assert int(got["imm"]) >= 100, got          # most of the 128 shared loads take an immediate offset
