"""Checks of the numba-cuda backend against the numpy reference, run as a script.

    NUMBA_ENABLE_CUDASIM=1 python tests/backends/numba_cuda_check.py [SECTION ...]   (the CPU simulator)
    python tests/backends/numba_cuda_check.py [SECTION ...]                          (a real GPU)

tests/backends/test_numba_cuda.py starts it in a subprocess, so the simulator never leaks into the
rest of the test session. Relative error = max |got - ref| / max |ref|, within 1e-4 in float32 and
1e-10 in float64. Sections (all of them without arguments):

  kernels     every layer primitive on tiny shapes, both GEMM kernels on odd shapes and every operand
              layout, in float32 and float64
  models      whole models on a 1x1x8x8 input against the numpy backend: logits, loss, every gradient
              and one optimizer step (fused: cuda_optim): UNet(depth=1, base_channels=2) with
              cross-entropy and SGD (plain; batch-norm and bilinear upsampling), AttentionUNet with
              softmax Dice and Adam, UNetPlusPlus with BCE and AdamW (those two with input_grad=False)
  table       every primitive of the table is the backend's own (none is the reference function), and
              the fused optimizer updates are there
  input_grad  conv2d_backward(input_grad=False): dx is None, dw and db as with input_grad=True, and the
              dx work is skipped (one GEMM fewer, no col2im launch)
  losses      BCE with logits (pos_weight broadcast several ways), softmax Dice (ignore_index, without
              the background class, the eps clamp) and sigmoid Dice, forward and backward, and through
              the loss classes
  optim       SGD / Adam / AdamW through unet_np.optim on numba-cuda parameters (one fused kernel per
              parameter and step: counted) against the same optimizers' array code, three steps

Prints one line per check and exits 1 if any fails.
"""
import contextlib
import sys
import time

import numpy as np

T0 = time.time()
from numba import config as numba_config  # noqa: E402
from numba import cuda  # noqa: E402

from unet_np import backends  # noqa: E402
from unet_np.backends.numpy_backend import reference_ops  # noqa: E402
from unet_np.kernels import cuda_gemm  # noqa: E402

from optim_cases import OPTIM_CASES  # noqa: E402  (beside this script, which Python puts on sys.path)

# Under the simulator every CUDA thread of a block is a Python thread, and the threads of a block wait
# for one another (syncthreads, the end of a launch). With Python's default switch interval (5 ms) a
# waiting thread can hold the interpreter for the whole interval: the 3-D 'kernels' section ran for
# more than 300 s that way on a quiet 2-core machine, 37.5 s with 0.1 ms. Results are unchanged (the
# simulator's threads of a block do not race: every kernel writes disjoint outputs).
if numba_config.ENABLE_CUDASIM:
    sys.setswitchinterval(1e-4)

REF = reference_ops()
B = backends.get("numba-cuda")
TOL = {np.float32: 1e-4, np.float64: 1e-10}
failures = []


def rel(got, ref, floor=0.0):
    got = np.asarray(backends.to_numpy(got), dtype=np.float64)
    ref = np.asarray(backends.to_numpy(ref), dtype=np.float64)
    if got.shape != ref.shape:
        return np.inf
    if np.isnan(ref).any() or np.isnan(got).any():
        return 0.0 if np.array_equal(np.isnan(got), np.isnan(ref)) and \
            np.allclose(got[~np.isnan(ref)], ref[~np.isnan(ref)]) else np.inf
    scale = max(np.abs(ref).max(initial=0.0), floor, 1e-30)
    return float(np.abs(got - ref).max(initial=0.0) / scale)


def check(name, got, ref, dt, tol=None, floor=0.0):
    err = rel(got, ref, floor)
    tol = TOL[dt] if tol is None else tol
    ok = err <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name:<58s} {np.dtype(dt).name:8s} rel err {err:.2e}")
    if not ok:
        failures.append(name)


def pairs(name, got, ref, dt):
    for i, (g, r) in enumerate(zip(got, ref)):
        if r is None:
            assert g is None, name
            continue
        check(f"{name}[{i}]", g, r, dt)


rng = np.random.default_rng(0)


def rnd(*shape, dt=np.float64):
    return rng.standard_normal(shape).astype(dt)


def gemm_checks(dt):
    M, N, K = 7, 13, 37
    # split-K: C has 2 tiles of 8x8, so with split_blocks=64 K = 37 is cut into 3 slices of 16, 16, 5
    split = dict(cuda_gemm.SIM_CONFIG, split_blocks=64, split_min_k=8)
    assert cuda_gemm.k_splits(2, K, split) == 4 and cuda_gemm.k_splits(2, K, cuda_gemm.SIM_CONFIG) == 1
    for cfg in (dict(kind="tiled", tile=4, max_blocks=3), cuda_gemm.SIM_CONFIG, split):
        kind = cfg["kind"] + (" split-K" if cfg is split else "")
        a, b, bias = rnd(M, K, dt=dt), rnd(K, N, dt=dt), rnd(M, dt=dt)
        c = cuda.device_array(M * N, dt)
        cuda_gemm.gemm(cuda.to_device(a.ravel()), cuda.to_device(b.ravel()), c, M, N, K,
                       cuda_gemm.dense(K), cuda_gemm.dense(N), cuda_gemm.dense(N),
                       bias=cuda.to_device(bias), relu=True, config=cfg)
        check(f"gemm {kind} + bias + relu", c.copy_to_host().reshape(M, N),
              np.maximum(a @ b + bias[:, None], 0), dt)
        partials = dict(getattr(cuda_gemm._scratch, "bufs", {}))     # after the first split-K call
        # transposed A, B read from NCHW (batch folded into the columns), C written as NCHW
        n, plane = 2, 5
        at = rnd(K, M, dt=dt)                                       # A = at^T
        b4 = rnd(n, K, plane, dt=dt)                                # B = (K, n*plane)
        c4 = cuda.device_array(n * M * plane, dt)
        cuda_gemm.gemm(cuda.to_device(at.ravel()), cuda.to_device(b4.ravel()), c4, M, n * plane, K,
                       cuda_gemm.dense(M, trans=True), cuda_gemm.nchw(K, plane),
                       cuda_gemm.nchw(M, plane), config=cfg)
        ref = np.einsum("km,nkp->nmp", at, b4)
        check(f"gemm {kind} A^T, NCHW B and C", c4.copy_to_host().reshape(n, M, plane), ref, dt)
        if cfg is split:   # the second split-K GEMM (fewer partial sums) reused the first one's buffer
            reused = [buf is partials.get(key) for key, buf in cuda_gemm._scratch.bufs.items()
                      if key[1] == np.dtype(dt)]
            check_equal(f"gemm split-K partials buffer reused ({np.dtype(dt).name})", reused, [True])


def gemm_batched_checks(dt):
    """cuda_gemm.gemm_batched: every (trans_a, trans_b) kernel, sizes that are not multiples of the
    tiles, batch > 1, a shared A (stride 0), strided C (ldc > N), bias + ReLU, split-K, and a grid
    smaller than the tiles and the batch (the block-stride loops)."""
    sim = cuda_gemm.BATCHED_SIM_CONFIG
    grid2 = dict(sim, max_blocks=2, max_batch_blocks=2)
    split = dict(sim, split_blocks=64, split_min_k=4)
    cases = [  # batch, M, N, K, trans_a, trans_b, config, shared A, bias+relu
        (3, 9, 11, 7, False, False, sim, False, True),
        (2, 9, 11, 7, False, True, grid2, False, False),
        (3, 5, 13, 10, True, False, grid2, True, True),
        (1, 8, 8, 8, True, True, sim, False, False),
        (2, 7, 6, 21, False, True, split, False, True),
    ]
    for batch, M, N, K, ta, tb, cfg, shared, act in cases:
        a = rnd(1 if shared else batch, *((K, M) if ta else (M, K)), dt=dt)
        b = rnd(batch, *((N, K) if tb else (K, N)), dt=dt)
        bias = rnd(M, dt=dt) if act else None
        ldc = N + 3                                                 # C rows with a gap
        c = cuda.to_device(np.full(batch * M * ldc, 7.0, dtype=dt))
        cuda_gemm.gemm_batched(cuda.to_device(a.ravel()), cuda.to_device(b.ravel()), c, M, N, K, batch,
                               trans_a=ta, trans_b=tb, ldc=ldc, sa=0 if shared else None, sc=M * ldc,
                               bias=None if bias is None else cuda.to_device(bias), relu=act, config=cfg)
        op_a = a.transpose(0, 2, 1) if ta else a
        op_b = b.transpose(0, 2, 1) if tb else b
        want = op_a @ op_b + (0 if bias is None else bias[:, None])
        want = np.maximum(want, 0) if act else want
        got = c.copy_to_host().reshape(batch, M, ldc)
        tag = (f"gemm_batched b{batch} {M}x{N}x{K} {'T' if ta else 'N'}{'T' if tb else 'N'}"
               f"{' shared A' if shared else ''}{' +bias+relu' if act else ''}"
               f"{' split-K' if cfg is split else ''}{' grid 2x2' if cfg is grid2 else ''}")
        check(tag, got[:, :, :N], want, dt)
        check_equal(tag + " leaves the gap", bool((got[:, :, N:] == 7).all()), True)
    assert cuda_gemm.k_splits(2 * 1, 21, split) > 1          # the split case does split
    # sum_batch: C = sum_b op(A[b]) @ op(B[b]) (a weight gradient over the images), with and without split-K
    for batch, M, N, K, tb, cfg in ((3, 9, 11, 7, True, sim), (2, 7, 6, 21, True, split), (4, 5, 9, 6, False, grid2)):
        a, b = rnd(batch, M, K, dt=dt), rnd(batch, *((N, K) if tb else (K, N)), dt=dt)
        c = cuda.device_array(M * N, dt)
        cuda_gemm.gemm_batched(cuda.to_device(a.ravel()), cuda.to_device(b.ravel()), c, M, N, K, batch,
                               trans_b=tb, sum_batch=True, config=cfg)
        want = (a @ (b.transpose(0, 2, 1) if tb else b)).sum(axis=0)
        check(f"gemm_batched sum_batch b{batch} {M}x{N}x{K}{' split-K' if cfg is split else ''}",
              c.copy_to_host().reshape(M, N), want, dt)
    if not B.simulated:     # on a GPU: the default tiles (64x64 and 128x128, 8x8 per thread), edges
        for batch, M, N, K, ta, tb in ((3, 200, 300, 70, False, False), (2, 64, 517, 129, False, True),
                                       (36, 130, 75, 33, True, False), (2, 96, 64, 3000, False, True)):
            a = rnd(batch, *((K, M) if ta else (M, K)), dt=dt)
            b = rnd(batch, *((N, K) if tb else (K, N)), dt=dt)
            c = cuda.device_array(batch * M * N, dt)
            cuda_gemm.gemm_batched(cuda.to_device(a.ravel()), cuda.to_device(b.ravel()), c, M, N, K, batch,
                                   trans_a=ta, trans_b=tb)
            want = (a.transpose(0, 2, 1) if ta else a) @ (b.transpose(0, 2, 1) if tb else b)
            check(f"gemm_batched GPU tiles b{batch} {M}x{N}x{K} {'T' if ta else 'N'}{'T' if tb else 'N'}",
                  c.copy_to_host().reshape(batch, M, N), want, dt)
        batch, M, N, K = 16, 64, 576, 4096                       # a weight gradient: split-K and sum_batch
        a, b = rnd(batch, M, K, dt=dt), rnd(batch, N, K, dt=dt)
        c = cuda.device_array(M * N, dt)
        cuda_gemm.gemm_batched(cuda.to_device(a.ravel()), cuda.to_device(b.ravel()), c, M, N, K, batch,
                               trans_b=True, sum_batch=True)
        check(f"gemm_batched GPU tiles sum_batch b{batch} {M}x{N}x{K} NT", c.copy_to_host().reshape(M, N),
              (a @ b.transpose(0, 2, 1)).sum(axis=0), dt)


def bias_relu_checks(dt):
    from unet_np.kernels import cuda_elementwise as ew
    x, b = rnd(2, 3, 4, 5, dt=dt), rnd(3, dt=dt)
    y = cuda.device_array(x.size, dt)
    ew.bias_relu_kernel[1, 8](cuda.to_device(x.ravel()), cuda.to_device(b), 3, 20, True, y)
    check("bias_relu kernel", y.copy_to_host().reshape(x.shape),
          np.maximum(x + b.reshape(1, 3, 1, 1), 0), dt)


def conv_checks(dt):
    cases = [  # x shape, w shape, stride, padding, dilation, bias
        ((2, 3, 5, 6), (4, 3, 3, 3), 1, 1, 1, True),
        ((1, 2, 7, 6), (3, 2, 3, 2), 2, ((1, 0), (0, 1)), 2, True),
        ((2, 3, 4, 4), (2, 3, 1, 1), 1, 0, 1, True),
        ((1, 2, 6, 6), (2, 2, 2, 2), 2, 0, 1, False),
    ]
    for xs, ws, s, p, d, bias in cases:
        x, w = rnd(*xs, dt=dt), rnd(*ws, dt=dt)
        b = rnd(ws[0], dt=dt) if bias else None
        name = f"conv2d x{xs} w{ws} s{s} p{p} d{d}"
        yr, cr = REF["conv2d_forward"](x, w, b, s, p, d)
        yg, cg = B.conv2d_forward(x, w, b, s, p, d)
        check(name + " fwd", yg, yr, dt)
        dy = rnd(*yr.shape, dt=dt)
        pairs(name + " bwd", B.conv2d_backward(dy, cg), REF["conv2d_backward"](dy, cr), dt)
    winograd_checks(dt)
    fused_relu_checks(dt)
    tcases = [  # x shape, w shape (Cin, Cout, kh, kw), stride, padding, output_padding, dilation
        ((2, 3, 3, 4), (3, 2, 2, 2), 2, 0, 0, 1),
        ((1, 2, 3, 3), (2, 3, 3, 3), 2, 1, 1, 1),
        ((2, 3, 4, 3), (3, 2, 1, 1), 1, 0, 0, 1),
        ((1, 2, 3, 4), (2, 2, 3, 2), 1, (1, 0), 0, 2),
    ]
    for xs, ws, s, p, op, d in tcases:
        x, w, b = rnd(*xs, dt=dt), rnd(*ws, dt=dt), rnd(ws[1], dt=dt)
        name = f"conv_transpose2d x{xs} w{ws} s{s} p{p} op{op} d{d}"
        yr, cr = REF["conv_transpose2d_forward"](x, w, b, s, p, op, d)
        yg, cg = B.conv_transpose2d_forward(x, w, b, s, p, op, d)
        check(name + " fwd", yg, yr, dt)
        dy = rnd(*yr.shape, dt=dt)
        pairs(name + " bwd", B.conv_transpose2d_backward(dy, cg),
              REF["conv_transpose2d_backward"](dy, cr), dt)


def winograd_checks(dt):
    """3x3 stride-1 convolutions through kernels/cuda_winograd.py: forced ('always') on small cases
    (partial tiles, uneven padding, padding 3), and taken by 'auto' from 16 channels."""
    from unet_np.kernels import cuda_winograd
    cases = [  # x shape, w shape, padding, bias, mode
        ((2, 2, 5, 6), (3, 2, 3, 3), 1, True, "always"),
        ((1, 3, 6, 5), (2, 3, 3, 3), ((2, 0), (1, 2)), False, "always"),
        ((1, 2, 9, 7), (2, 2, 3, 3), 3, True, "always"),
        ((1, 16, 4, 5), (16, 16, 3, 3), 1, True, "auto"),
    ]
    for xs, ws, p, bias, mode in cases:
        x, w = rnd(*xs, dt=dt), rnd(*ws, dt=dt)
        b = rnd(ws[0], dt=dt) if bias else None
        name = f"winograd ({mode}) x{xs} w{ws} p{p}"
        B.settings["winograd"] = mode
        try:
            with counting(cuda_winograd, "wino_input_kernel") as c:
                yg, cg = B.conv2d_forward(x, w, b, 1, p, 1)
                dy = rnd(*yg.shape, dt=dt)
                got = B.conv2d_backward(dy, cg)
        finally:
            B.settings["winograd"] = "auto"
        yr, cr = REF["conv2d_forward"](x, w, b, 1, p, 1)
        check_equal(name + " ran Winograd", c["wino_input_kernel"].calls >= 3, True)
        check(name + " fwd", yg, yr, dt)
        pairs(name + " bwd", got, REF["conv2d_backward"](dy, cr), dt)


def fused_relu_checks(dt):
    """conv2d_forward(..., activation='relu') on each path (Winograd, 1x1, im2col) against the
    reference conv2d followed by the reference ReLU, forward and backward (the mask applied to dy)."""
    cases = [  # x shape, w shape, stride, padding, winograd mode
        ((1, 2, 5, 6), (3, 2, 3, 3), 1, 1, "always"),
        ((2, 3, 4, 4), (2, 3, 1, 1), 1, 0, "auto"),
        ((1, 2, 7, 6), (3, 2, 3, 2), 2, 1, "never"),
    ]
    from unet_np.kernels import cuda_elementwise as ew
    check_equal("numba-cuda offers the fused conv2d_relu", "conv2d_relu" in B.fused, True)
    for xs, ws, s, p, mode in cases:
        x, w, b = rnd(*xs, dt=dt), rnd(*ws, dt=dt), rnd(ws[0], dt=dt)
        name = f"conv2d+relu fused x{xs} w{ws} s{s} p{p} {mode}"
        yc, cc = REF["conv2d_forward"](x, w, b, s, p, 1)
        yr, cr = REF["relu_forward"](yc)
        B.settings["winograd"] = mode
        try:
            yg, cg = B.conv2d_forward(x, w, b, s, p, 1, activation="relu")
            dy = rnd(*yr.shape, dt=dt)
            with counting(ew, "relu_backward_kernel") as c:
                got = B.conv2d_backward(dy, cg)
        finally:
            B.settings["winograd"] = "auto"
        # Winograd applies the mask inside its transforms; the other paths in one relu_backward pass
        check_equal(name + " relu_backward passes", c["relu_backward_kernel"].calls,
                    0 if mode == "always" else 1)
        check(name + " fwd", yg, yr, dt)
        pairs(name + " bwd", got, REF["conv2d_backward"](REF["relu_backward"](dy, cr), cc), dt)


def layer_checks(dt):
    # max-pool, with ties (small integers) and padding
    for xs, k, s, p in (((2, 2, 5, 6), 2, 2, 0), ((1, 2, 5, 5), 3, 2, 1), ((1, 1, 4, 5), (2, 3), 1, (1, 1))):
        x = rng.integers(-2, 3, size=xs).astype(dt)
        name = f"maxpool2d x{xs} k{k} s{s} p{p}"
        yr, cr = REF["maxpool2d_forward"](x, k, s, p)
        yg, cg = B.maxpool2d_forward(x, k, s, p)
        check(name + " fwd", yg, yr, dt)
        dy = rnd(*yr.shape, dt=dt)
        check(name + " bwd", B.maxpool2d_backward(dy, cg), REF["maxpool2d_backward"](dy, cr), dt)
    x = rnd(2, 3, 4, 5, dt=dt)
    x[0, 0, 0, :2] = 0
    dy = rnd(*x.shape, dt=dt)
    for op in ("relu", "sigmoid"):
        yr, cr = REF[f"{op}_forward"](x * 3)
        yg, cg = B.ops[f"{op}_forward"](x * 3)
        check(f"{op} fwd", yg, yr, dt)
        check(f"{op} bwd", B.ops[f"{op}_backward"](dy, cg), REF[f"{op}_backward"](dy, cr), dt)
    # ReLU backward where y <= 0 is dy * 0: a NaN in dy stays NaN (as NumPy and elementwise.cu)
    yr, cr = REF["relu_forward"](x)
    dy_nan = dy.copy()
    dy_nan[0, 0, 0, 0] = np.nan                            # x there is 0: y = 0
    got = B.ops["relu_backward"](dy_nan, B.ops["relu_forward"](x)[1])
    check_equal("relu bwd keeps a NaN of dy where y = 0", bool(np.isnan(backends.to_numpy(got)[0, 0, 0, 0])),
                True)
    check("relu bwd with a NaN in dy", got, REF["relu_backward"](dy_nan, cr), dt)
    # reflect padding must be smaller than the padded dimension: a clear error
    for pads in ((4, 0, 0, 0), (0, 0, 0, 5), (-1, 0, 0, 0)):
        try:
            B.pad2d_forward(rnd(1, 1, 5, 4, dt=dt), pads, "reflect")
            raised = "nothing"
        except ValueError as exc:
            raised = "ValueError" if "smaller than the padded dimension" in str(exc) else str(exc)
        check_equal(f"pad2d reflect {pads} on 5x4 refused", raised, "ValueError")
    # bilinear: the same taps and sums as upsample.cu (its C++ emulation, when g++ is there)
    bilinear_twin_checks(dt)
    for mode in ("bilinear", "nearest"):
        for scale in (2, (3, 2)):
            x = rnd(1, 2, 3, 4, dt=dt)
            f, bk = f"upsample_{mode}2d_forward", f"upsample_{mode}2d_backward"
            yr, cr = REF[f](x, scale)
            yg, cg = B.ops[f](x, scale)
            check(f"upsample {mode} x{scale} fwd", yg, yr, dt)
            dy = rnd(*yr.shape, dt=dt)
            check(f"upsample {mode} x{scale} bwd", B.ops[bk](dy, cg), REF[bk](dy, cr), dt)
    xs = [rnd(2, c, 3, 4, dt=dt) for c in (1, 3, 2)]
    yr, cr = REF["concat_forward"](xs, 1)
    yg, cg = B.concat_forward(xs, 1)
    check("concat fwd", yg, yr, dt)
    dy = rnd(*yr.shape, dt=dt)
    pairs("concat bwd", B.concat_backward(dy, cg), REF["concat_backward"](dy, cr), dt)
    x = rnd(2, 2, 7, 6, dt=dt)
    yr, cr = REF["center_crop_forward"](x, (4, 3))
    yg, cg = B.center_crop_forward(x, (4, 3))
    check("center_crop fwd", yg, yr, dt)
    dy = rnd(*yr.shape, dt=dt)
    check("center_crop bwd", B.center_crop_backward(dy, cg), REF["center_crop_backward"](dy, cr), dt)
    for mode, pads in (("constant", (1, 2, 0, 3)), ("reflect", (2, 1, 3, 2)), ("reflect", (3, 3, 2, 2))):
        x = rnd(1, 2, 4, 4, dt=dt)
        yr, cr = REF["pad2d_forward"](x, pads, mode, 0.5)
        yg, cg = B.pad2d_forward(x, pads, mode, 0.5)
        check(f"pad2d {mode} {pads} fwd", yg, yr, dt)
        dy = rnd(*yr.shape, dt=dt)
        check(f"pad2d {mode} {pads} bwd", B.pad2d_backward(dy, cg), REF["pad2d_backward"](dy, cr), dt)
    # batch-norm: training (affine and not) and evaluation
    x = rnd(2, 3, 4, 5, dt=dt) * 2 + 1
    g, b = rnd(3, dt=dt), rnd(3, dt=dt)
    rm, rv = rnd(3, dt=dt), np.abs(rnd(3, dt=dt)) + 0.5
    dy = rnd(*x.shape, dt=dt)
    for training in (True, False):
        for gamma, beta in ((g, b), (None, None)):
            name = f"batchnorm2d train={training} affine={gamma is not None}"
            rr = REF["batchnorm2d_forward"](x, gamma, beta, rm, rv, 1e-5, training)
            gg = B.batchnorm2d_forward(x, gamma, beta, rm, rv, 1e-5, training)
            check(name + " fwd", gg[0], rr[0], dt)
            if training:
                check(name + " mean", gg[2], rr[2], dt)
                check(name + " var", gg[3], rr[3], dt)
            pairs(name + " bwd", B.batchnorm2d_backward(dy, gg[1]),
                  REF["batchnorm2d_backward"](dy, rr[1]), dt)
    # softmax cross-entropy: plain; class + pixel weights with ignore_index; everything ignored
    x = rnd(2, 3, 3, 4, dt=dt) * 3
    t = rng.integers(0, 3, size=(2, 3, 4))
    t_ign = t.copy()
    t_ign[0, 0, :2] = -1
    cw, pw = np.abs(rnd(3, dt=dt)) + 0.1, np.abs(rnd(2, 3, 4, dt=dt))
    for name, args in (("plain", (t, None, -100, None)), ("weights+ignore", (t_ign, cw, -1, pw)),
                       ("all ignored", (np.full_like(t, 7), None, 7, None))):
        lr, cr = REF["softmax_cross_entropy_forward"](x, *args)
        lg, cg = B.softmax_cross_entropy_forward(x, *args)
        check(f"cross-entropy {name} loss", lg, lr, dt)
        check(f"cross-entropy {name} dlogits", B.softmax_cross_entropy_backward(cg),
              REF["softmax_cross_entropy_backward"](cr), dt)


def bilinear_twin_checks(dt):
    """numba-cuda's bilinear kernels against upsample.cu's (built by g++ through the emulation of
    tests/backends/cuda_emulation.py): the same formula, so in float64 they agree to rounding."""
    import shutil
    if shutil.which("g++") is None:
        print("skip bilinear twin check: g++ is not installed")
        return
    from cuda_emulation import emulated_kernels          # beside this script
    k = emulated_kernels()
    for shape, scale in (((1, 2, 3, 4), 2), ((2, 1, 5, 3), (3, 2)), ((1, 1, 1, 2), (4, 1))):
        x = rnd(*shape, dt=dt)
        y_cu, c_cu = k.upsample_bilinear2d_forward(x, scale)
        y_nb, c_nb = B.ops["upsample_bilinear2d_forward"](x, scale)
        tol = 1e-14 if dt == np.float64 else 1e-6
        check(f"bilinear x{scale} numba-cuda == upsample.cu fwd", y_nb, y_cu, dt, tol=tol)
        dy = rnd(*y_cu.shape, dt=dt)
        check(f"bilinear x{scale} numba-cuda == upsample.cu bwd", B.ops["upsample_bilinear2d_backward"](dy, c_nb),
              k.upsample_bilinear2d_backward(dy, c_cu), dt, tol=tol)


def biases_before_batchnorm(model):
    from unet_np.nn import BatchNorm2d, Conv2d, Conv3d, Sequential
    names = set()
    for prefix, m in model.named_modules():
        if isinstance(m, Sequential):
            kids = list(m._modules.items())
            for (name, a), (_, b) in zip(kids, kids[1:]):
                if isinstance(a, (Conv2d, Conv3d)) and isinstance(b, BatchNorm2d) and a.bias is not None:
                    names.add(f"{prefix}{name}.bias")
    return names


# model, its arguments, loss, optimizer, input_grad of the backward, dtypes (the simulator is slow:
# the other architectures and losses run in one dtype each)
MODEL_CASES = [
    ("UNet", dict(num_classes=2), "cross-entropy", "SGD", True, (np.float32, np.float64)),
    ("UNet", dict(num_classes=2, batchnorm=True, upsample="bilinear"), "cross-entropy", "SGD", True,
     (np.float32, np.float64)),
    ("AttentionUNet", dict(num_classes=3), "softmax Dice", "Adam", False, (np.float32,)),
    ("UNetPlusPlus", dict(num_classes=1), "BCE", "AdamW", False, (np.float64,)),
]


def check_gradients(tag, ref, g_got, g_ref, dt):
    """Every parameter gradient g_got[name] against the reference model ref's g_ref[name]. The bias of
    a convolution followed by batch-norm has a gradient of exactly 0 in exact arithmetic (the
    normalisation removes any constant shift): both sides hold rounding noise there, so those are
    compared relative to the model's largest gradient instead. (numba_cuda_check3d.py uses it too.)"""
    big = max(np.abs(g).max() for g in g_ref.values())
    before_bn = biases_before_batchnorm(ref)
    for n in g_ref:
        check(f"{tag} grad {n}", g_got[n], g_ref[n], dt, floor=big if n in before_bn else 0.0)


def model_checks(dt):
    import unet_np
    from unet_np import optim
    from unet_np.nn import BCEWithLogitsLoss, CrossEntropyLoss, DiceLoss
    for cls, kw, loss_name, opt_name, input_grad, dtypes in MODEL_CASES:
        if dt not in dtypes:
            continue
        make = getattr(unet_np, cls)
        ref = make(1, depth=1, base_channels=2, dtype=dt, **kw)
        gpu = make(1, depth=1, base_channels=2, dtype=dt, backend="numba-cuda", **kw)
        gpu.load_state_dict(ref.state_dict())
        x = rnd(1, 1, 8, 8, dt=dt)
        C = kw["num_classes"]
        if loss_name == "BCE":
            t = rng.uniform(0, 1, (1, C, 8, 8)).astype(dt)
        else:
            t = rng.integers(0, C, size=(1, 8, 8))
        tag = f"{cls}(1, depth=1, base_channels=2, {kw}) {loss_name} {opt_name}"
        losses = []
        for m in (ref, gpu):
            opt = getattr(optim, opt_name)(m.parameters(), **(dict(lr=0.1, momentum=0.9) if opt_name == "SGD"
                                                                else dict(lr=0.01)))
            loss_fn = {"cross-entropy": CrossEntropyLoss, "softmax Dice": DiceLoss,
                       "BCE": BCEWithLogitsLoss}[loss_name](backend=m.backend)
            m.zero_grad()
            logits = m.forward(x)
            loss = loss_fn.forward(logits, t)
            dx = m.backward(loss_fn.backward(), input_grad=input_grad)
            grads = {n: backends.to_numpy(p.grad).copy() for n, p in m.named_parameters()}
            opt.step()
            losses.append((logits, loss, dx, grads, m.state_dict()))
        (lr_, l_r, dx_r, g_r, s_r), (lg, l_g, dx_g, g_g, s_g) = losses
        check(f"{tag} logits", lg, lr_, dt)
        check(f"{tag} loss", np.float64(l_g), np.float64(l_r), dt)
        if input_grad:
            check(f"{tag} dx", dx_g, dx_r, dt)
        else:
            check_equal(f"{tag} dx is None with input_grad=False", (dx_g is None, dx_r is None), (True, True))
        check_gradients(tag, ref, g_g, g_r, dt)
        for n in s_r:
            check(f"{tag} after {opt_name} step {n}", s_g[n], s_r[n], dt)


# -- counting launches (to see that work is skipped, or done in one kernel) ---------------------------
class _Counted:
    """Stands in for a numba.cuda kernel (kernel[grid, block](...)) or a function, counting calls."""

    def __init__(self, target):
        self.target, self.calls = target, 0

    def __getitem__(self, config):
        run = self.target[config]

        def launch(*args):
            self.calls += 1
            return run(*args)
        return launch

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.target(*args, **kwargs)


@contextlib.contextmanager
def counting(module, *names):
    """Replace module.<name> by a _Counted for the duration; yields {name: counter}."""
    saved = {n: getattr(module, n) for n in names}
    counters = {n: _Counted(k) for n, k in saved.items()}
    for n, c in counters.items():
        setattr(module, n, c)
    try:
        yield counters
    finally:
        for n, k in saved.items():
            setattr(module, n, k)


def check_equal(name, got, want):
    ok = (got is want) if got is None or want is None else bool(got == want)
    print(f"{'ok  ' if ok else 'FAIL'} {name:<58s} got {got!r}, expected {want!r}")
    if not ok:
        failures.append(name)


# -- the table ------------------------------------------------------------------------------------------
# The primitives the numba-cuda backend still takes from the numpy reference: none (the 3-D family's
# kernels are in kernels/cuda_vol.py, checked by numba_cuda_check3d.py). Listed by name if one ever is.
KNOWN_FALLBACKS = ()


def table_checks():
    own = [n for n in REF if B.ops[n] is not REF[n]]
    check_equal("numba-cuda table: primitives", sorted(B.ops), sorted(REF))
    fallbacks = sorted(set(REF) - set(own))
    check_equal("numba-cuda table: primitives that are the reference's (none expected)",
                [n for n in fallbacks if n not in KNOWN_FALLBACKS], [])
    check_equal("numba-cuda table: known fallbacks are reference primitives",
                [n for n in KNOWN_FALLBACKS if n not in REF], [])
    check_equal("numba-cuda fused updates", (callable(B.sgd_step), callable(B.adam_step)), (True, True))


# -- conv2d_backward(input_grad=False) ---------------------------------------------------------------------
def input_grad_checks(dt):
    from unet_np.kernels import cuda_conv
    cases = [  # x shape, w shape, stride, padding, dilation, bias
        ((2, 3, 5, 6), (4, 3, 3, 3), 1, 1, 1, True),         # im2col path
        ((2, 3, 4, 4), (2, 3, 1, 1), 1, 0, 1, True),         # 1x1 path (no column buffer)
        ((1, 2, 7, 6), (3, 2, 3, 2), 2, ((1, 0), (0, 1)), 2, False),
    ]
    for xs, ws, s, p, d, bias in cases:
        x, w = rnd(*xs, dt=dt), rnd(*ws, dt=dt)
        b = rnd(ws[0], dt=dt) if bias else None
        name = f"conv2d x{xs} w{ws} s{s} p{p} d{d} input_grad=False"
        yr, cr = REF["conv2d_forward"](x, w, b, s, p, d)
        dy = rnd(*yr.shape, dt=dt)
        _, dw_r, db_r = REF["conv2d_backward"](dy, cr, input_grad=False)
        counts = []
        for input_grad in (True, False):
            _, cg = B.conv2d_forward(x, w, b, s, p, d)
            # the cache keeps the input, no column buffer: nothing in it larger than x or w
            kept = max(a.size for a in cg if hasattr(a, "size") and not isinstance(a, (int, float)))
            check_equal(name + " cache holds no column buffer", kept <= max(x.size, w.size), True)
            with counting(cuda_gemm, "gemm", "gemm_batched") as g, \
                    counting(cuda_conv, "col2im_kernel", "im2col_kernel") as c:
                got = B.conv2d_backward(dy, cg, input_grad=input_grad)
            counts.append(sum(k.calls for k in g.values()) + c["col2im_kernel"].calls
                          + c["im2col_kernel"].calls)
            if input_grad:
                full = got
        dx, dw, db = got
        check_equal(name + " dx", dx, None)
        check(name + " dw", dw, dw_r, dt)
        check(name + " dw == dw with input_grad", dw, full[1], dt, tol=0.0)
        if bias:
            check(name + " db", db, db_r, dt)
        else:
            check_equal(name + " db", db, None)
        work, work_no_dx = counts          # GEMMs and column passes, whichever algorithm runs
        check_equal(name + " less work without dx", work_no_dx < work, True)


# -- losses ------------------------------------------------------------------------------------------------
def _loss_pair(name, fwd, bwd, args, dt):
    lr_, cr = REF[fwd](*args)
    lg, cg = B.ops[fwd](*args)
    check_equal(f"{name} loss dtype and shape", (np.dtype(backends.to_numpy(lg).dtype), np.shape(lg)),
                (np.dtype(dt), ()))
    check(f"{name} loss", lg, lr_, dt)
    check(f"{name} dlogits", B.ops[bwd](cg), REF[bwd](cr), dt)


def loss_checks(dt):
    from unet_np.nn import BCEWithLogitsLoss, DiceLoss
    x = rnd(2, 3, 3, 4, dt=dt) * 4
    x.reshape(-1)[:2] = (40.0, -40.0)                          # large logits: no overflow
    tf = rng.uniform(0, 1, x.shape).astype(dt)
    for what, pw in (("no pos_weight", None), ("pos_weight (C, 1, 1)", rng.uniform(0.5, 3, (3, 1, 1))),
                     ("pos_weight (W,)", rng.uniform(0.5, 3, (4,))),
                     ("pos_weight full", rng.uniform(0.5, 3, x.shape))):
        pw = None if pw is None else pw.astype(dt)
        _loss_pair(f"bce_with_logits {what}", "bce_with_logits_forward", "bce_with_logits_backward",
                   (x, tf, pw), dt)
    _loss_pair("bce_with_logits 0-d", "bce_with_logits_forward", "bce_with_logits_backward",
               (np.asarray(-1.5, dtype=dt), np.asarray(0.25, dtype=dt), None), dt)
    # The eps clamp max(P_c + T_c + smooth, eps): with smooth=0, eps=1 it is active for class / channel 2
    # alone (absent from the target and, nearly, from the prediction); with eps=60 for every class (the
    # sums over these 24 pixels stay below 60), where D_c != 0 and beta_c must be 0.
    x_absent = x.copy()
    x_absent[:, 2] -= 30
    tf_absent = tf.copy()
    tf_absent[:, 2] = 0
    for what, xx, t, smooth, eps in (("smooth=1", x, tf, 1.0, 1e-7),
                                     ("smooth=0, eps clamp", x_absent, tf_absent, 0.0, 1.0),
                                     ("eps clamp on every class", x, tf, 0.5, 60.0)):
        _loss_pair(f"sigmoid_dice {what}", "sigmoid_dice_forward", "sigmoid_dice_backward",
                   (xx, t, smooth, eps), dt)
    t = rng.integers(0, 3, size=(2, 3, 4))
    t_ign = t.copy()
    t_ign[0, 0, :3] = -100
    t_absent = np.where(t == 2, 0, t)
    for what, xx, tt, smooth, eps, incl in (
            ("plain", x, t, 1.0, 1e-7, True), ("ignore_index", x, t_ign, 1.0, 1e-7, True),
            ("no background", x, t_ign, 1.0, 1e-7, False),
            ("smooth=0, eps clamp", x_absent, t_absent, 0.0, 1.0, True),
            ("eps clamp on every class", x, t_ign, 0.5, 60.0, True)):
        _loss_pair(f"softmax_dice {what}", "softmax_dice_forward", "softmax_dice_backward",
                   (xx, tt, smooth, eps, -100, incl), dt)
    # through the loss classes, as a model's training step calls them
    for loss_ref, loss_gpu, target in (
            (BCEWithLogitsLoss(pos_weight=np.array([[[2.0]], [[0.5]], [[1.0]]])),
             BCEWithLogitsLoss(pos_weight=np.array([[[2.0]], [[0.5]], [[1.0]]]), backend=B), tf),
            (DiceLoss(), DiceLoss(backend=B), t_ign),
            (DiceLoss(mode="sigmoid", smooth=0.5), DiceLoss(mode="sigmoid", smooth=0.5, backend=B), tf)):
        tag = f"{type(loss_ref).__name__}({loss_ref.extra_repr()})" if hasattr(loss_ref, "extra_repr") else ""
        lr_ = loss_ref.forward(x, target)
        lg = loss_gpu.forward(x, target)
        check(f"{tag} forward", np.float64(lg), np.float64(lr_), dt)
        check(f"{tag} backward x0.5", loss_gpu.backward(0.5), loss_ref.backward(0.5), dt)


# -- fused optimizer updates -------------------------------------------------------------------------------


def optim_checks(dt):
    from unet_np import optim
    from unet_np.kernels import cuda_optim
    from unet_np.nn import Parameter
    shapes = [(3, 2, 3, 3), (3,), (2, 5)]
    for name, hp in OPTIM_CASES:
        tag = f"{name}({', '.join(f'{k}={v}' for k, v in hp.items())})"
        init = [rnd(*shape, dt=dt) for shape in shapes]
        ref = [Parameter(a.copy()) for a in init]             # no backend: the array code
        gpu = [Parameter(B.asarray(a.copy())) for a in init]
        for p in gpu:
            p.backend = B                                      # as a numba-cuda module sets it
        opt_ref = getattr(optim, name)(ref, **hp)
        opt_gpu = getattr(optim, name)(gpu, **hp)
        with counting(cuda_optim, "sgd_step_kernel", "adam_step_kernel") as n:
            for step in range(1, 4):
                for pr, pg in zip(ref, gpu):
                    g = rnd(*pr.shape, dt=dt) * (0.1 if step == 2 else 1.0)
                    pr.grad[...] = g
                    pg.grad[...] = B.asarray(g)
                opt_ref.step()
                opt_gpu.step()
                check_equal(f"{tag} {np.dtype(dt).name} fused launches after step {step}",
                            sum(c.calls for c in n.values()), step * len(shapes))
                for i, (pr, pg) in enumerate(zip(ref, gpu)):
                    check(f"{tag} step {step} p{i}", pg.data, pr.data, dt)
                    for buf, value in opt_ref.state[i].items():
                        check(f"{tag} step {step} p{i} {buf}", opt_gpu.state[i][buf], value, dt)
        check_equal(f"{tag} state_dict names", sorted(opt_gpu.state_dict()), sorted(opt_ref.state_dict()))


SECTIONS = ("kernels", "models", "table", "input_grad", "losses", "optim")


def chosen_sections(argv, known):
    """The sections named in argv (all of ``known`` when none is), or None, after saying which name is
    unknown."""
    sections = tuple(argv) or known
    unknown = [s for s in sections if s not in known]
    if unknown:
        print(f"unknown section {unknown[0]!r}: expected some of {', '.join(known)}")
        return None
    return sections


def main(argv=()):
    # No sys.setswitchinterval speed-up here: with a 1e-4 s switch interval the simulator gave wrong
    # results in about one run in three (seen in the model checks: loss, dx, first-layer weight
    # gradient), and none in repeated runs at the default interval.
    sections = chosen_sections(argv, SECTIONS)
    if sections is None:
        return 2
    print(f"numba-cuda backend: simulator={B.simulated}, xp={B.xp.__name__}; sections {', '.join(sections)}")
    if "table" in sections:
        table_checks()
    for dt in (np.float32, np.float64):
        if "kernels" in sections:
            gemm_checks(dt)
            gemm_batched_checks(dt)
            bias_relu_checks(dt)
            conv_checks(dt)
            layer_checks(dt)
        if "input_grad" in sections:
            input_grad_checks(dt)
        if "losses" in sections:
            loss_checks(dt)
        if "optim" in sections:
            optim_checks(dt)
    if "models" in sections:
        for dt in (np.float64, np.float32):
            model_checks(dt)
    print(f"{len(failures)} failures; {time.time() - T0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
