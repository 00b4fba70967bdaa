"""Fused optimizer updates for Numba-CUDA: one pass over each parameter instead of five to ten array
operations.

NumPy reference: unet_np/optim.py SGD._update and Adam._update (AdamW: the decoupled decay), which
repeat torch.optim's single-tensor updates operation for operation; the CUDA C twin is
kernels/cuda/optim.cu. The same order of operations is kept here. Every hyper-parameter arrives as a
scalar of the parameter's dtype (np.float32 or np.float64, rounded on the host as NumPy rounds a
Python float that meets a float32 array), so a float32 update computes in float32 throughout.
Python side: unet_np/backends/numba_cuda_backend.py (sgd_step, adam_step).

  sgd_step_kernel    g = grad + weight_decay * p
                     buf = g (first step), else buf = momentum * buf + (1 - dampening) * g
                     g = g + momentum * buf (nesterov), else g = buf      (only when use_momentum)
                     p = p - lr * g
  adam_step_kernel   p = p * (1 - lr * weight_decay)                      (AdamW: decoupled)
                     g = grad + weight_decay * p                          (Adam: L2 in the gradient)
                     m = m + (1 - beta1) (g - m)       (torch's lerp; its other branch, g - (g - m) beta1,
                                                        when 1 - beta1 >= 0.5)
                     v = beta2 v + (1 - beta2) g^2
                     vmax = max(vmax, v), and v below is vmax             (amsgrad)
                     p = p - (m * step_size) / (sqrt(v) / bc2_sqrt + eps)
                     step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t)

All arrays flat and of one dtype; p, buf, m, v, vmax are updated in place. Unused buffers (buf without
momentum, vmax without amsgrad) may be any array of the dtype: they are never touched. Grid-stride
loops (launch shapes: cuda_launch.grid_1d).
"""
import math

from numba import cuda


@cuda.jit
def sgd_step_kernel(p, grad, buf, lr, momentum, one_minus_dampening, weight_decay, use_momentum, nesterov,
                    first):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
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


@cuda.jit
def adam_step_kernel(p, grad, m, v, vmax, weight_decay, decay_factor, decoupled, w1, one_minus_w1, beta2,
                     one_minus_beta2, step_size, bc2_sqrt, eps, amsgrad):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
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
        denom = math.sqrt(vi) / bc2_sqrt + eps
        p[i] = pi - (mi * step_size) / denom
