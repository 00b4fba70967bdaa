"""Every CUDA C source in kernels/cuda/ compiles for sm_90 with nvcc (PTX only: no GPU needed), and
the sources agree with the Python code that launches them.

The nvcc checks skip cleanly when nvcc is not installed; the source checks need nothing.
(The kernels' results are checked in tests/backends/test_cupy.py, on a GPU and in a CPU emulation.)
"""
import os
import re
import shutil
import subprocess

import pytest

from unet_np.backends import cupy_backend as cb

CU_FILES = sorted(f"{family}.cu" for family in cb.FAMILIES)
KERNEL_DIR = os.path.dirname(os.path.abspath(str(cb.kernel_path("conv"))))


def test_every_family_has_its_file_and_nothing_else():
    on_disk = sorted(f for f in os.listdir(KERNEL_DIR) if f.endswith(".cu"))
    assert on_disk == CU_FILES


@pytest.mark.parametrize("name", CU_FILES)
def test_nvcc_compiles_to_ptx(name, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    out = tmp_path / (name[:-3] + ".ptx")
    proc = subprocess.run([nvcc, "-arch=sm_90", "--ptx", "-o", str(out), os.path.join(KERNEL_DIR, name)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed on {name}:\n{proc.stdout}\n{proc.stderr}"
    ptx = out.read_text()
    for kernel in _entry_points(cb.kernel_source(name[:-3])):
        assert f".entry {kernel}(" in ptx, f"{kernel} is missing from the PTX of {name}"


def _entry_points(source):
    return re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(', source)


@pytest.mark.parametrize("name", CU_FILES)
def test_source_names_its_numpy_reference(name):
    head = cb.kernel_source(name[:-3]).lstrip()
    assert head.startswith("//"), f"{name} must begin with a comment"
    first = head.split("\n\n")[0]
    assert "NumPy reference:" in first, f"{name}'s first comment must name its NumPy reference function"


@pytest.mark.parametrize("name", CU_FILES)
def test_every_kernel_has_float32_and_float64_entry_points(name):
    entries = set(_entry_points(cb.kernel_source(name[:-3])))
    assert entries, f"{name} defines no extern \"C\" kernels"
    for e in entries:
        assert e.endswith(("_f32", "_f64")), f"{name}: {e} must end in _f32 or _f64"
        twin = e[:-3] + ("f64" if e.endswith("f32") else "f32")
        assert twin in entries, f"{name}: {e} has no {twin}"


def test_every_kernel_the_backend_launches_exists():
    from unet_np.kernels import cupy_conv, cupy_vol
    py = ""
    for module in (cb, cupy_conv, cupy_vol):
        with open(module.__file__, encoding="utf-8") as f:
            py += f.read()
    launched = set(re.findall(r'_launch\(\s*"(\w+)",\s*"(\w+)"', py))
    launched |= set(re.findall(r'_fn\(\s*"(\w+)",\s*"(\w+)"', py))
    launched |= {("gemm", f"gemm_tiled_v{v}") for v in (1, 2)}
    assert len(launched) > 20
    assert {("winograd", "wino_input"), ("conv", "im2col"), ("vol", "vol2col")} <= launched
    for family, kernel in sorted(launched):
        entries = set(_entry_points(cb.kernel_source(family)))
        for suffix in ("_f32", "_f64"):
            assert kernel + suffix in entries, f"{family}.cu has no {kernel + suffix}"


def test_sources_use_no_headers():
    """NVRTC (what CuPy compiles with) has no standard headers: the sources include nothing."""
    for name in CU_FILES:
        assert "#include" not in cb.kernel_source(name[:-3]), f"{name} includes a header"
