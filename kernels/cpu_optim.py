"""Fused optimizer updates for the numba backend: one parallel pass over each parameter instead of
five to ten NumPy array operations (each of which reads and writes whole arrays).

NumPy reference: unet_np/optim.py SGD._update and Adam._update (AdamW: the decoupled decay), which
repeat torch.optim's single-tensor updates operation for operation. These kernels keep the same
operations in the same order, element by element, with every hyper-parameter given as a scalar of
the parameter's dtype (as NumPy rounds a Python float that meets a float32 array) and no fused
multiply-adds (fastmath off), so they give the array code's results bit for bit (tested in
tests/backends/test_numba_backend.py). The GPU twins: kernels/cuda_optim.py (Numba-CUDA) and
kernels/cuda/optim.cu (CUDA C). Python side: unet_np/backends/numba_backend.py.

  sgd_step    g = grad + weight_decay * p
              buf = g (first step), else buf = momentum * buf + (1 - dampening) * g
              g = g + momentum * buf (nesterov), else g = buf              (only when use_momentum)
              p = p - lr * g
  adam_step   p = p * (1 - lr * weight_decay)                              (AdamW: decoupled)
              g = grad + weight_decay * p                                  (Adam: L2 in the gradient)
              m = m + (1 - beta1) (g - m)    (torch's lerp; its other branch, g - (g - m) beta1,
                                              when 1 - beta1 >= 0.5)
              v = beta2 v + (1 - beta2) g^2
              vmax = max(vmax, v), and v below is vmax                     (amsgrad)
              p = p - (m * step_size) / (sqrt(v) / bc2_sqrt + eps)
              step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t)

All arrays flat, of one dtype; p, buf, m, v, vmax are updated in place; an unused buffer (buf without
momentum, vmax without amsgrad) may be any array of the dtype: it is never touched.
"""
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=False)
def sgd_step(p, grad, buf, lr, momentum, one_minus_dampening, weight_decay, use_momentum, nesterov,
             first):
    for i in prange(p.size):
        g = grad[i]
        if weight_decay != 0:
            g = g + weight_decay * p[i]
        if use_momentum:
            if first:
                b = g
            else:
                b = buf[i] * momentum + one_minus_dampening * g
            buf[i] = b
            if nesterov:
                g = g + momentum * b
            else:
                g = b
        p[i] = p[i] - lr * g


@njit(parallel=True, cache=True, fastmath=False)
def adam_step(p, grad, m, v, vmax, weight_decay, decay_factor, decoupled, w1, one_minus_w1, beta2,
              one_minus_beta2, step_size, bc2_sqrt, eps, amsgrad):
    for i in prange(p.size):
        pi = p[i]
        g = grad[i]
        if weight_decay != 0:
            if decoupled:
                pi = pi * decay_factor
            else:
                g = g + weight_decay * pi
        mi = m[i]
        if w1 < 0.5:
            mi = mi + w1 * (g - mi)
        else:
            mi = g - (g - mi) * one_minus_w1
        m[i] = mi
        vi = v[i] * beta2 + (one_minus_beta2 * g) * g
        v[i] = vi
        if amsgrad:
            if vmax[i] > vi:
                vi = vmax[i]
            vmax[i] = vi
        denom = np.sqrt(vi) / bc2_sqrt + eps
        p[i] = pi - (mi * step_size) / denom
