"""Which way round should the cupy backend hand its convolution GEMMs to cuBLAS?

    python -m benchmarks.experiments.gpu_gemm_shapes [--batch 16] [--size 256]

The cupy backend computes a 3x3 convolution as Y (O, N*H*W) = W (O, 9C) @ cols (9C, N*H*W): a GEMM
with a short M (O = 64 at full resolution) and a very long N. The same product, transposed, is
Y^T (N*H*W, O) = cols^T (N*H*W, 9C) @ W^T (9C, O): the long side as M. cuBLAS picks its kernels by
shape, so the two can run at different speeds. This script times, float32, TF32 off, for the
convolutions of the article's network at the given batch and size:
  fwd    W @ cols                        vs   cols^T @ W^T          (the forward)
  dW     dY (O, P) @ cols^T (P, 9C)      (a long K: the weight gradient)
  dcols  W^T (9C, O) @ dY (O, P)         vs   dY^T (P, O) @ W (O, 9C)
each the median of 10 after 3 warm-ups, with cuBLAS's achieved TFLOPS. Nothing here is asserted.
"""
import argparse
import statistics

import numpy as np


def timed(cp, fn, reps=10, warm=3):
    for _ in range(warm):
        fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    import cupy as cp
    print(f"cupy {cp.__version__}, {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}; "
          f"float32, batch {args.batch}, {args.size}x{args.size}")
    # (O, C, spatial) of the article net's 3x3 convolutions (depth 2, base 64), channel counts > 1
    shapes = [(64, 64, args.size), (128, 128, args.size // 2), (256, 256, args.size // 4),
              (64, 128, args.size)]
    print("| O | 9C | P | GEMM | ms | TFLOPS |")
    print("|---|---|---|---|---|---|")
    rng = cp.random.default_rng(0)
    for O, C, s in shapes:
        K, P = 9 * C, args.batch * s * s
        w = rng.standard_normal((O, K), dtype=np.float32)
        cols = rng.standard_normal((K, P), dtype=np.float32)
        colsT = cp.ascontiguousarray(cols.T)
        dy = rng.standard_normal((O, P), dtype=np.float32)
        dyT = cp.ascontiguousarray(dy.T)
        flops = 2.0 * O * K * P
        cases = [
            ("fwd  W @ cols (O x P)", lambda: cp.matmul(w, cols)),
            ("fwd  cols^T @ W^T (P x O)", lambda: cp.matmul(colsT, w.T)),
            ("dW   dY @ cols^T", lambda: cp.matmul(dy, cols.T)),
            ("dW   dY @ (cols^T contiguous)", lambda: cp.matmul(dy, colsT)),
            ("dcols W^T @ dY (9C x P)", lambda: cp.matmul(w.T, dy)),
            ("dcols dY^T @ W (P x 9C)", lambda: cp.matmul(dyT, w)),
        ]
        for name, fn in cases:
            ms = timed(cp, fn)
            print(f"| {O} | {K} | {P} | {name} | {ms:.2f} | {flops / ms / 1e9:.1f} |")
        del w, cols, colsT, dy, dyT
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
