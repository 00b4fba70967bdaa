"""Batch normalisation for Numba-CUDA: the per-channel affine passes around the reductions.

NumPy reference: unet_np/nn/norm.py batchnorm2d_forward / batchnorm2d_backward. The statistics and
the backward's sums (mu, v, dbeta = sum dy, dgamma = sum dy * xhat) come from
cuda_reduce.channel_reduce_kernel; the kernels here are the elementwise passes:

  bn_forward_kernel    xhat = (x - mu_c) / sqrt(v_c + eps),  y = gamma_c xhat + beta_c
                       (training: mu, v are the batch's; evaluation: the running statistics)
  bn_backward_kernel   training:   dx = gamma_c / sigma_c * (dy - dbeta_c / M - xhat * dgamma_c / M)
                       evaluation: dx = gamma_c / sigma_c * dy

All arrays flat NCHW; per-channel vectors (C,); channel of element i is (i // plane) % C.
"""
import math

from numba import cuda


@cuda.jit
def bn_forward_kernel(x, mean, var, gamma, beta, has_gamma, has_beta, eps, C, plane, write_xhat,
                      xhat, y):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        c = (i // plane) % C
        inv_std = 1.0 / math.sqrt(var[c] + eps)
        xh = (x[i] - mean[c]) * inv_std
        if write_xhat:
            xhat[i] = xh
        v = xh * gamma[c] if has_gamma else xh
        if has_beta:
            v += beta[c]
        y[i] = v


@cuda.jit
def bn_backward_kernel(dy, xhat, var, gamma, has_gamma, eps, dbeta, dgamma, M, C, plane, training,
                       dx):
    for i in range(cuda.grid(1), dy.size, cuda.gridsize(1)):
        c = (i // plane) % C
        scale = 1.0 / math.sqrt(var[c] + eps)
        if has_gamma:
            scale *= gamma[c]
        if training:
            dx[i] = scale * (dy[i] - dbeta[c] / M - xhat[i] * (dgamma[c] / M))
        else:
            dx[i] = scale * dy[i]
