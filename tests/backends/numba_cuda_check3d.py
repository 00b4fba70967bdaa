"""Checks of the numba-cuda backend's volume (N, C, D, H, W) primitives against the numpy reference,
run as a script (the 3-D twin of numba_cuda_check.py, whose helpers it imports).

    NUMBA_ENABLE_CUDASIM=1 python tests/backends/numba_cuda_check3d.py [SECTION ...]   (the CPU simulator)
    python tests/backends/numba_cuda_check3d.py [SECTION ...]                          (a real GPU)

tests/backends/test_numba_cuda3d.py starts it in a subprocess. Relative error = max |got - ref| /
max |ref|, within 1e-4 in float32 and 1e-10 in float64 (numba_cuda_check.TOL); backward passes run
twice must agree to the bit (no atomics). Sections (all of them without arguments):

  kernels     every 3-D primitive (kernels/cuda_vol.py through unet_np/backends/numba_cuda_vol.py) on
              4^3-6^3 volumes, float32 and float64: conv3d and conv_transpose3d forward / backward
              (batch 2, anisotropic kernels and strides, (before, after) padding pairs, dilation, output
              padding, the 1x1x1 path; fused with ReLU: activation='relu'), maxpool3d (overlapping
              windows, padding, ties, a NaN), trilinear (align_corners False and True, a length-1 axis)
              and nearest upsampling, pad3d (constant, reflect), center_crop of volumes (and of an image)
  shared      the primitives that 2-D and 3-D share, on 5-D arrays: concat, batch-norm (BatchNorm3d,
              training and evaluation), ReLU, sigmoid, and every loss (softmax cross-entropy with class
              and pixel weights and ignore_index, BCE with pos_weight, softmax and sigmoid Dice)
  input_grad  conv3d_backward(input_grad=False): dx is None, dw and db as with input_grad=True, and the
              dx work is skipped (one GEMM and the col2vol launch fewer)
  table       every 3-D primitive is the backend's own (neither the reference nor a host fallback);
              'conv3d_relu' is in the backend's fused set; the steps a 3-D ConvBlock takes
  models      tiny 3-D UNets (depth 1, base_channels 2, 3 classes, batch 1) against the numpy backend:
              logits, loss, dx and every parameter gradient; batch-norm + transposed upsampling +
              cross-entropy on a 2x4x4 volume in float64, and trilinear upsampling + pad_input (reflect
              pad3d, 3x2x4 padded to 4x2x4) + softmax Dice in float32 (the simulator runs the GEMMs
              slowly: one model per dtype, batch 2 is checked in 'kernels')

Prints one line per check (FAIL lines for failures) and exits 1 if any fails.
"""
import sys
import time

import numpy as np

from numba_cuda_check import (B, REF, check, check_equal, check_gradients, chosen_sections, counting, failures,
                              rnd, rng)

from unet_np import backends  # noqa: E402
from unet_np.kernels import cuda_gemm, cuda_vol  # noqa: E402

T0 = time.time()
DTYPES = (np.float32, np.float64)


def run_pair(name, fwd, bwd, args, dt, twice=True):
    """fwd(*args) and bwd(dy, cache) on both backends: the output and every gradient compared; twice:
    the numba-cuda backward runs again and must agree bit for bit (the convolutions' backward passes,
    GEMMs and the col2vol gather, skip this: the simulator runs their GEMMs slowly)."""
    yr, cr = REF[fwd](*args)
    yg, cg = B.ops[fwd](*args)
    check(f"{name} forward", yg, yr, dt)
    dy = rnd(*yr.shape, dt=dt)
    ref = REF[bwd](dy, cr)
    got = B.ops[bwd](dy, cg)
    again = B.ops[bwd](dy, cg) if twice else got
    ref, got, again = ((g,) if not isinstance(g, tuple) else g for g in (ref, got, again))
    for i, (g, r, a) in enumerate(zip(got, ref, again)):
        if r is None:
            check_equal(f"{name} backward[{i}] is None", g, None)
            continue
        check(f"{name} backward[{i}]", g, r, dt)
        if twice:
            check(f"{name} backward[{i}] deterministic", a, g, dt, tol=0.0)


# x shape, w shape, stride, padding, dilation, bias
CONV3D_CASES = [
    ((2, 2, 3, 3, 3), (2, 2, 3, 3, 3), 1, 1, 1, True),
    ((1, 3, 3, 4, 5), (2, 3, 1, 3, 3), (1, 2, 1), ((0, 1), (1, 0), (1, 1)), 1, True),
    ((1, 2, 6, 5, 5), (2, 2, 2, 2, 3), (2, 1, 2), (1, 0, 2), (2, 1, 2), False),
    ((2, 3, 2, 3, 2), (2, 3, 1, 1, 1), 1, 0, 1, True),                    # 1x1x1: no columns
]
# x shape, w shape, stride, padding, output_padding, dilation, bias
CONVT3D_CASES = [
    ((2, 3, 3, 2, 3), (3, 2, 2, 2, 2), 2, 0, 0, 1, True),                 # the U-Net's up-convolution
    ((1, 2, 3, 4, 3), (2, 3, 3, 1, 3), (2, 1, 1), ((1, 0), (0, 0), (1, 1)), (1, 0, 0), (1, 1, 2), False),
]


def kernel_checks(dt):
    for xs, ws, s, p, d, bias in CONV3D_CASES:
        x, w = rnd(*xs, dt=dt), rnd(*ws, dt=dt)
        b = rnd(ws[0], dt=dt) if bias else None
        run_pair(f"conv3d x{xs} w{ws} s{s} p{p} d{d}", "conv3d_forward", "conv3d_backward",
                 (x, w, b, s, p, d), dt, twice=False)
    for xs, ws, s, p, op, d, bias in CONVT3D_CASES:
        x, w = rnd(*xs, dt=dt), rnd(*ws, dt=dt)
        b = rnd(ws[1], dt=dt) if bias else None
        run_pair(f"conv_transpose3d x{xs} w{ws} s{s} p{p} op{op} d{d}", "conv_transpose3d_forward",
                 "conv_transpose3d_backward", (x, w, b, s, p, op, d), dt, twice=False)
    x = rnd(2, 2, 4, 5, 4, dt=dt)
    ties = rng.integers(0, 3, size=(1, 2, 4, 4, 5)).astype(dt)       # many equal maxima
    nan = rnd(1, 1, 4, 4, 4, dt=dt)
    nan[0, 0, 1, 2, 1] = np.nan
    for what, xx, k, s, p in (("2x2x2", x, 2, 2, 0), ("3, stride (2,1,2), pad 1", x, 3, (2, 1, 2), 1),
                              ("(1,2,2) in-plane", x, (1, 2, 2), (1, 2, 2), 0),
                              ("ties, overlapping", ties, (2, 3, 2), 1, (1, 1, 0)),
                              ("NaN", nan, 2, 2, 0)):
        run_pair(f"maxpool3d {what}", "maxpool3d_forward", "maxpool3d_backward", (xx, k, s, p), dt)
    for scale, corners, shape in ((2, False, (2, 2, 3, 4, 3)), ((1, 2, 3), False, (1, 2, 3, 3, 2)),
                                  (2, True, (2, 2, 3, 4, 3)), ((2, 3, 1), True, (1, 2, 1, 3, 2))):
        run_pair(f"upsample_trilinear3d x{shape} scale {scale} align_corners={corners}",
                 "upsample_trilinear3d_forward", "upsample_trilinear3d_backward",
                 (rnd(*shape, dt=dt), scale, corners), dt)
    for scale in (2, (2, 1, 3)):
        run_pair(f"upsample_nearest3d scale {scale}", "upsample_nearest3d_forward",
                 "upsample_nearest3d_backward", (rnd(2, 2, 3, 2, 3, dt=dt), scale), dt)
    for mode in ("constant", "reflect"):
        run_pair(f"pad3d {mode} (1, 2, 0, 3, 2, 1)", "pad3d_forward", "pad3d_backward",
                 (x, (1, 2, 0, 3, 2, 1), mode, 0.5), dt)
    for xx, size in ((x, (3, 2, 3)), (x, (3, 3)), (rnd(1, 2, 5, 6, dt=dt), (3, 4))):
        run_pair(f"center_crop {xx.shape} -> {size}", "center_crop_forward", "center_crop_backward",
                 (xx, size), dt)


def fused_relu_checks(dt):
    """conv3d_forward(..., activation='relu') (the backend lists 'conv3d_relu'): y = relu(conv3d) and the
    backward masks dy where y <= 0 first, against the reference's conv3d and relu one after the other."""
    for xs, ws, s, p, d, bias in CONV3D_CASES[2:]:          # the column and the 1x1x1 paths
        x, w = rnd(*xs, dt=dt), rnd(*ws, dt=dt)
        b = rnd(ws[0], dt=dt) if bias else None
        name = f"conv3d + relu fused x{xs} w{ws}"
        z, cz = REF["conv3d_forward"](x, w, b, s, p, d)
        yr, cr = REF["relu_forward"](z)
        yg, cg = B.conv3d_forward(x, w, b, s, p, d, activation="relu")
        check(f"{name} forward", yg, yr, dt)
        dy = rnd(*yr.shape, dt=dt)
        ref = REF["conv3d_backward"](REF["relu_backward"](dy, cr), cz)
        for i, (g, r) in enumerate(zip(B.conv3d_backward(dy, cg), ref)):
            if r is None:
                check_equal(f"{name} backward[{i}] is None", g, None)
            else:
                check(f"{name} backward[{i}]", g, r, dt)


def shared_checks(dt):
    from unet_np.nn import BatchNorm3d
    xs = [rnd(2, c, 3, 4, 2, dt=dt) for c in (2, 1, 3)]
    yr, cr = REF["concat_forward"](xs, 1)
    yg, cg = B.concat_forward(xs, 1)
    check("concat 5-D axis 1 forward", yg, yr, dt)
    dy = rnd(*yr.shape, dt=dt)
    for i, (g, r) in enumerate(zip(B.concat_backward(dy, cg), REF["concat_backward"](dy, cr))):
        check(f"concat 5-D axis 1 backward[{i}]", g, r, dt)
    x = rnd(2, 3, 3, 4, 2, dt=dt) * 2 + 1
    for name in ("relu", "sigmoid"):
        run_pair(f"{name} 5-D", f"{name}_forward", f"{name}_backward", (x,), dt)
    for training in (True, False):
        layers = [BatchNorm3d(3, dtype=dt), BatchNorm3d(3, dtype=dt, backend=B)]
        for m in layers:
            m.weight.data[...] = np.array([1.5, -0.5, 2.0])
            m.bias.data[...] = np.array([0.1, 0.2, -0.3])
            m.running_mean[...] = np.array([0.5, -1.0, 0.0])
            m.running_var[...] = np.array([2.0, 0.5, 1.0])
            m.train(training)
        (ref, gpu), tag = layers, f"BatchNorm3d {'training' if training else 'evaluation'}"
        check(f"{tag} forward", gpu.forward(x), ref.forward(x), dt)
        dy = rnd(*x.shape, dt=dt)
        check(f"{tag} dx", gpu.backward(dy), ref.backward(dy), dt)
        for n in ("weight", "bias"):
            check(f"{tag} d{n}", getattr(gpu, n).grad, getattr(ref, n).grad, dt)
        if training:
            for n in ("running_mean", "running_var"):
                check(f"{tag} {n}", getattr(gpu, n), getattr(ref, n), dt)
    logits = rnd(2, 3, 3, 4, 2, dt=dt) * 3
    t = rng.integers(0, 3, size=(2, 3, 4, 2))
    t[0, 1, :2, 0] = -100
    pw = rng.uniform(0.5, 2, (2, 3, 4, 2)).astype(dt)
    tf = rng.uniform(0, 1, logits.shape).astype(dt)
    for name, fwd, bwd, args in (
            ("softmax_cross_entropy class + pixel weights, ignore_index", "softmax_cross_entropy_forward",
             "softmax_cross_entropy_backward", (logits, t, np.array([1.0, 2.0, 0.5], dtype=dt), -100, pw)),
            ("bce_with_logits pos_weight (C, 1, 1, 1)", "bce_with_logits_forward", "bce_with_logits_backward",
             (logits, tf, rng.uniform(0.5, 3, (3, 1, 1, 1)).astype(dt))),
            ("softmax_dice ignore_index, no background", "softmax_dice_forward", "softmax_dice_backward",
             (logits, t, 1.0, 1e-7, -100, False)),
            ("sigmoid_dice", "sigmoid_dice_forward", "sigmoid_dice_backward", (logits, tf, 0.5, 1e-7))):
        lr_, cr = REF[fwd](*args)
        lg, cg = B.ops[fwd](*args)
        check(f"{name} 5-D loss", lg, lr_, dt)
        check(f"{name} 5-D dlogits", B.ops[bwd](cg), REF[bwd](cr), dt)


def input_grad_checks(dt):
    for xs, ws, s, p, d, bias in CONV3D_CASES[2:]:          # the im2col and the 1x1x1 paths
        x, w = rnd(*xs, dt=dt), rnd(*ws, dt=dt)
        b = rnd(ws[0], dt=dt) if bias else None
        name = f"conv3d x{xs} w{ws} input_grad=False"
        yr, cr = REF["conv3d_forward"](x, w, b, s, p, d)
        dy = rnd(*yr.shape, dt=dt)
        _, dw_r, db_r = REF["conv3d_backward"](dy, cr, input_grad=False)
        counts, results = [], []
        _, cg = B.conv3d_forward(x, w, b, s, p, d)
        kept = max(a.size for a in cg if hasattr(a, "size") and hasattr(a, "shape"))
        check_equal(f"{name} cache holds no column buffer", kept <= max(x.size, w.size), True)
        for input_grad in (True, False):                   # a backward leaves its cache as it was
            with counting(cuda_gemm, "gemm_batched") as g, counting(cuda_vol, "col2vol_kernel") as c:
                results.append(B.conv3d_backward(dy, cg, input_grad=input_grad))
            counts.append(g["gemm_batched"].calls + c["col2vol_kernel"].calls)
        full, (dx, dw, db) = results
        check_equal(f"{name} dx", dx, None)
        check(f"{name} dw", dw, dw_r, dt)
        check(f"{name} dw == dw with input_grad", dw, full[1], dt, tol=0.0)
        if bias:
            check(f"{name} db", db, db_r, dt)
        else:
            check_equal(f"{name} db", db, None)
        check_equal(f"{name} less work without dx ({counts[1]} < {counts[0]} launches)",
                    counts[1] < counts[0], True)


def table_checks():
    import unet_np
    from unet_np.models.base import ConvBlock
    vol = [n for n in REF if "3d" in n] + ["center_crop_forward", "center_crop_backward"]
    borrowed = [n for n in vol if B.ops[n] is REF[n] or hasattr(B.ops[n], "reference")]
    check_equal("numba-cuda 3-D primitives that are the reference's or host fallbacks", borrowed, [])
    check_equal("numba-cuda 3-D primitives listed", len(vol), 14)
    check_equal("numba-cuda offers the fused conv3d_relu", "conv3d_relu" in B.fused, True)
    # Which way a 3-D ConvBlock runs is unet_np.models' choice (it fuses a Conv3d -> ReLU pair where the
    # backend lists conv3d_relu, if it fuses 3-D at all): either way each step is a layer or such a pair,
    # and the models section checks the numbers.
    model = unet_np.UNet(1, 2, depth=1, base_channels=2, spatial_dims=3, backend=B)
    blocks = [m for _, m in model.named_modules() if isinstance(m, ConvBlock)]
    steps = [tuple(type(m).__name__ for m in step) for blk in blocks for step in blk._steps()]
    fused = sum(step == ("Conv3d", "ReLU") for step in steps)
    well_formed = all(len(step) == 1 or step == ("Conv3d", "ReLU") for step in steps)
    check_equal(f"3-D ConvBlocks ({len(blocks)}): {fused} fused Conv3d -> ReLU steps, the rest single "
                f"layers", (len(blocks) > 0, well_formed), (True, True))


# model arguments, loss, input shape, dtypes (the simulator is slow: one architecture per dtype pair)
MODEL_CASES = [
    (dict(batchnorm=True, upsample="transpose"), "cross-entropy", (1, 1, 2, 4, 4), (np.float64,)),
    (dict(upsample="bilinear", pad_input=True), "softmax Dice", (1, 1, 3, 2, 4), (np.float32,)),
]


def model_checks(dt):
    import unet_np
    from unet_np.nn import CrossEntropyLoss, DiceLoss
    for kw, loss_name, shape, dtypes in MODEL_CASES:
        if dt not in dtypes:
            continue
        ref = unet_np.UNet(1, 3, depth=1, base_channels=2, spatial_dims=3, dtype=dt, **kw)
        gpu = unet_np.UNet(1, 3, depth=1, base_channels=2, spatial_dims=3, dtype=dt, backend="numba-cuda",
                           **kw)
        gpu.load_state_dict(ref.state_dict())
        x = rnd(*shape, dt=dt)
        t = rng.integers(0, 3, size=(shape[0],) + shape[2:])
        tag = f"UNet 3-D {kw} {loss_name}"
        out = []
        for m in (ref, gpu):
            loss_fn = (CrossEntropyLoss if loss_name == "cross-entropy" else DiceLoss)(backend=m.backend)
            m.zero_grad()
            logits = m.forward(x)
            loss = loss_fn.forward(logits, t)
            dx = m.backward(loss_fn.backward())
            grads = {n: backends.to_numpy(p.grad).copy() for n, p in m.named_parameters()}
            out.append((logits, loss, dx, grads))
        (lr_, l_r, dx_r, g_r), (lg, l_g, dx_g, g_g) = out
        check(f"{tag} logits", lg, lr_, dt)
        check(f"{tag} loss", np.float64(l_g), np.float64(l_r), dt)
        check(f"{tag} dx", dx_g, dx_r, dt)
        check_gradients(tag, ref, g_g, g_r, dt)
        check_equal(f"{tag} gradients compared", len(g_r) == len(g_g) > 0, True)


SECTIONS = ("kernels", "shared", "input_grad", "table", "models")


def main(argv=()):
    sections = chosen_sections(argv, SECTIONS)
    if sections is None:
        return 2
    print(f"numba-cuda backend (3-D): simulator={B.simulated}, xp={B.xp.__name__}; sections "
          f"{', '.join(sections)}")
    if "table" in sections:
        table_checks()
    for dt in DTYPES:
        if "kernels" in sections:
            kernel_checks(dt)
            fused_relu_checks(dt)
        if "shared" in sections:
            shared_checks(dt)
        if "input_grad" in sections:
            input_grad_checks(dt)
        if "models" in sections:
            model_checks(dt)
    print(f"{len(failures)} failures; {time.time() - T0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
