"""Smoke test of the CPU benchmark harness (benchmarks/cpu.py): it runs end to end on a tiny network
and writes what it promises. No speed is asserted anywhere (speed is measured, never tested)."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import cpu  # noqa: E402
from unet_np import UNet  # noqa: E402
from unet_np.nn import Conv2d, ConvTranspose2d  # noqa: E402

TINY = {"tiny": dict(desc="tiny: UNet(1, 2, depth=1, base_channels=4)",
                     kwargs=dict(in_channels=1, num_classes=2, depth=1, base_channels=4), torch="generic")}


def test_flops_of_one_conv_match_a_hand_count():
    # Conv2d 3 -> 5, 3x3, padding 1 on (2, 3, 8, 8): every one of 2*5*8*8 outputs takes 3*3*3 MACs.
    assert cpu.unet_flops(Conv2d(3, 5, 3, padding=1), (2, 3, 8, 8)) == 2 * (2 * 5 * 8 * 8) * (3 * 3 * 3)
    # no padding, stride 2: output 3x3 from 8x8
    assert cpu.unet_flops(Conv2d(3, 5, 3, stride=2), (1, 3, 8, 8)) == 2 * (5 * 3 * 3) * 27
    # ConvTranspose2d 3 -> 5, 2x2 stride 2 on (2, 3, 8, 8): every input pixel scatters 5*2*2 MACs per channel
    assert cpu.unet_flops(ConvTranspose2d(3, 5, 2, stride=2), (2, 3, 8, 8)) == 2 * (2 * 3 * 8 * 8) * (5 * 4)


def test_flops_of_a_tiny_unet_match_a_hand_count():
    m = UNet(1, 2, depth=1, base_channels=4)
    hw, hw2 = 16 * 16, 8 * 8
    macs = (hw * 4 * 9 * 1 + hw * 4 * 9 * 4          # enc1: 1->4, 4->4 at 16x16
            + hw2 * 8 * 9 * 4 + hw2 * 8 * 9 * 8      # bottleneck: 4->8, 8->8 at 8x8
            + hw2 * 8 * 4 * 4                        # up1: 8->4, 2x2 stride 2, from 8x8
            + hw * 4 * 9 * 8 + hw * 4 * 9 * 4        # dec1: 8->4, 4->4 at 16x16
            + hw * 2 * 4)                            # final 1x1: 4->2
    assert cpu.unet_flops(m, (1, 1, 16, 16)) == 2 * macs
    assert cpu.unet_flops(m, (3, 1, 16, 16)) == 3 * 2 * macs
    # the article network: 12.64 GFLOP per 128x128 image (DESIGN.md); with 'same' padding the count
    # scales with the pixels, so a 32x32 image (cheaper to trace) is 1/16 of it
    assert abs(16 * cpu.unet_flops(UNet(1, 2, depth=2, base_channels=64), (1, 1, 32, 32)) / 1e9 - 12.64) < 0.01


def test_harness_runs_on_a_tiny_network_and_writes_its_outputs(tmp_path):
    threads_before = torch.get_num_threads()
    try:
        cases = cpu.plan_cases(["tiny"], ["train", "forward"], [1], [16])
        res = cpu.run_benchmark(TINY, cases, threads=1, peak_gflops=cpu.sgemm_peak(n=64, repeats=1)["gflops"],
                                target_s=0, min_repeats=1, max_repeats=1, warmup=1, memory=True,
                                memory_sides=("unet_np",),  # a torch child costs seconds of import
                                log=lambda *a: None)
        prof = cpu.run_profile(TINY["tiny"], 1, 16, steps=1, warmup=0)
    finally:
        torch.set_num_threads(threads_before)
    res.update(schema="unet_np-cpu-bench/1", date="2000-01-01T00:00:00", mode="smoke", argv=[], threads=1,
               backend="numpy", env=dict(unset=None), machine=cpu.machine_info(1), versions=cpu.versions(),
               blas=cpu.blas_info(), sgemm=cpu.sgemm_peak(n=64, repeats=1), torch_sgemm=cpu.torch_sgemm(64, 1),
               profile=prof)
    paths = cpu.write_outputs(res, str(tmp_path), stamp="smoke")
    for p in paths.values():
        assert (tmp_path / p.split("/")[-1]).stat().st_size > 0

    data = json.loads((tmp_path / "cpu-latest.json").read_text())
    assert data == json.loads((tmp_path / "cpu-smoke.json").read_text())
    for key in ("machine", "versions", "blas", "sgemm", "nets", "cases", "skipped", "memory_method", "profile"):
        assert key in data
    assert data["nets"]["tiny"]["logits_rel_diff"] < 1e-4          # same weights on both sides
    assert [(c["mode"], c["batch"], c["size"]) for c in data["cases"]] == [("train", 1, 16), ("forward", 1, 16)]
    flops = cpu.unet_flops(UNet(1, 2, depth=1, base_channels=4), (1, 1, 16, 16))
    for c in data["cases"]:
        assert c["flops"] == (3 * flops if c["mode"] == "train" else flops)
        assert c["repeats"] == 1 and c["ratio"] > 0
        for side in ("unet_np", "torch"):
            s = c[side]
            assert len(s["times_s"]) == 1 and s["median_s"] > 0 and s["gflops"] > 0 and s["pct_peak"] > 0
        mem = c["unet_np"]["memory"]
        assert np.isfinite(mem["peak_rss_growth_mib"]) and mem["tracemalloc_peak_mib"] > 0
    kinds = {e["type"] for e in data["profile"]["by_type"]}
    assert {"Conv2d", "ConvTranspose2d", "ReLU", "MaxPool2d", "loss", "optimizer"} <= kinds
    assert abs(sum(e["percent"] for e in data["profile"]["by_type"]) - 100) < 1.0
    md = (tmp_path / "cpu-latest.md").read_text()
    assert "| tiny | train | 1 | 16 |" in md and "How memory was measured" in md


def test_gpu_harness_smoke_runs_on_the_cpu_and_writes_its_outputs(tmp_path):
    """benchmarks/gpu.py --smoke: the whole GPU harness (both sides, the weight check, the per-layer
    breakdown, the outputs) with the numpy backend in place of the GPU ones and PyTorch on the CPU.
    Only the plumbing is checked here; the GPU run itself happens on a lent machine (benchmarks/gpu.sh)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--smoke", "--nets", "article", "--repeats", "1",
                        "--warmup", "1", "--gemm-n", "0", "--out", str(tmp_path)], cwd=root, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    jsons = list(tmp_path.glob("gpu-*.json"))
    assert len(jsons) == 1 and jsons[0].with_suffix(".md").exists()
    data = json.loads(jsons[0].read_text())
    assert data["nets"]["article"]["check_rel_err"] < 1e-4          # same weights on both sides
    assert "| article | train |" in r.stdout and "Where the cupy training step goes" in r.stdout


def test_smaller_runs_never_replace_the_full_sweeps_files():
    """cpu-latest.* (quoted by the README) come from the full sweep only; smaller runs get own names."""
    name = lambda *argv: cpu.results_name(cpu.build_parser().parse_args(list(argv)))  # noqa: E731
    assert name() == name("--threads", "2", "--backend", "numba") == "cpu"
    assert name("--quick") == "cpu-quick" and name("--profile-only") == "cpu-profile"
    for narrowed in (["--nets", "depth4"], ["--batches", "8"], ["--sizes", "128"], ["--modes", "train"]):
        assert name(*narrowed) == "cpu-partial", narrowed


def test_cpu3d_harness_runs_on_a_tiny_volume_with_the_same_network_on_both_sides(tmp_path):
    """benchmarks/cpu3d.py: the library's 3-D UNet and the PyTorch twin give the same logits from the
    same weights (float32, relative 1e-5), and the harness writes its JSON and table with both sides'
    times and their ratio (1 batch of 8^3, the numpy backend, one repeat, no memory children)."""
    import subprocess
    import sys
    from benchmarks import cpu3d
    ours = cpu3d.build_ours("numpy")
    theirs = cpu3d.build_torch(ours).float()       # the test session may default to float64
    x, _ = cpu3d.make_inputs(1, 8)
    want = theirs(torch.from_numpy(x)).detach().numpy()
    assert np.abs(ours.forward(x) - want).max() <= 1e-5 * np.abs(want).max()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu3d", "--threads", "1", "--backend", "numpy",
                           "--cases", "1x8", "--repeats", "1", "--no-memory", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.glob("cpu3d-*.json")
    case = json.loads(result.read_text())["cases"]["1x8"]
    for mode in ("train", "forward"):
        r = case[mode]
        assert r["unet_np_s"] > 0 and r["torch_s"] > 0
        assert abs(r["ratio"] - r["unet_np_s"] / r["torch_s"]) < 1e-9
    assert "| 1x8 |" in (tmp_path / "cpu3d-latest.md").read_text()
