"""Batch normalisation: BatchNorm2d.

Primitives (plain NumPy):

    batchnorm2d_forward(x, gamma, beta, mean, var, eps, training)
        -> (y, cache, batch_mean, batch_var)
    batchnorm2d_backward(dy, cache) -> (dx, dgamma, dbeta)

In training the statistics are the batch's own (per channel over N, H, W; the biased variance
normalises) and the backward differentiates through them; in evaluation ``mean`` and ``var`` (the
running statistics) are constants and the layer is a fixed per-channel affine map. The layer class
owns the running statistics and their momentum update; the primitives are pure functions.
Derivation in long form: docs/backprop.md#batch-normalisation.
"""
import numpy as np

from .module import Module, Parameter, check_input

OPS = ("batchnorm2d_forward", "batchnorm2d_backward")


def channel_sum(a):
    """(N, C, H, W) -> (C,): the sum per channel, pairwise over each contiguous H*W plane."""
    N, C = a.shape[:2]
    return a.reshape(N, C, -1).sum(axis=2).sum(axis=0)


def channel_dot(a, b):
    """(N, C, H, W) x2 -> (C,): sum of a * b per channel, as N*C BLAS dot products (no temporary
    of the full size; the products are summed with several accumulators, about as accurate as a
    pairwise sum for these lengths)."""
    N, C = a.shape[:2]
    a3, b3 = a.reshape(N, C, 1, -1), b.reshape(N, C, -1, 1)
    return np.matmul(a3, b3).reshape(N, C).sum(axis=0)


def per_channel(v):
    return v.reshape(1, -1, 1, 1)


def batchnorm2d_forward(x, gamma, beta, mean, var, eps, training):
    """y = gamma * (x - mu) / sqrt(v + eps) + beta, per channel.

    x: (N, C, H, W); gamma, beta: (C,) or None (no affine: 1 and 0); mean, var: (C,) running
    statistics, used only when ``training`` is False (may be None otherwise); eps: float.
    training True: mu, v are the batch mean and biased variance over (N, H, W), M = N*H*W values.
    Returns y (N, C, H, W); cache for the backward; batch_mean, batch_var (C,) (the biased variance;
    None in evaluation) from which the caller updates its running statistics.
    A constant channel has v = 0 and normalises to 0 (no NaN while eps > 0).
    """
    if training:
        M = x.size // x.shape[1]
        mu = channel_sum(x) / M
        xhat = x - per_channel(mu)                      # x - mu, normalised in place below
        y = np.square(xhat)                              # y's buffer first holds (x - mu)^2
        v = channel_sum(y) / M                          # two-pass variance: no cancellation
        inv_std = 1.0 / np.sqrt(v + eps)
        xhat *= per_channel(inv_std)
        if gamma is None:
            y[...] = xhat
        else:
            np.multiply(xhat, per_channel(gamma), out=y)
        if beta is not None:
            y += per_channel(beta)
        return y, (True, xhat, gamma, inv_std), mu, v
    # evaluation: y = x * a + c with a = gamma / sqrt(var + eps), c = beta - mean * a
    inv_std = (1.0 / np.sqrt(var + eps)).astype(x.dtype, copy=False)
    a = inv_std if gamma is None else gamma * inv_std
    c = -mean * a if beta is None else beta - mean * a
    y = x * per_channel(a.astype(x.dtype, copy=False))
    y += per_channel(c.astype(x.dtype, copy=False))
    return y, (False, x, gamma, inv_std, mean), None, None


def batchnorm2d_backward(dy, cache):
    """dy: (N, C, H, W) -> dx (N, C, H, W), dgamma (C,), dbeta (C,) (sums over N, H, W).

    dbeta = sum dy, dgamma = sum dy * xhat in both modes. Training, per channel with M values,
    sigma = sqrt(v + eps), xhat = (x - mu) / sigma and g = dL/dxhat = gamma dy:
        dxhat_i/dx_j = (delta_ij - 1/M - xhat_i xhat_j / M) / sigma
    (mu moves by 1/M; sigma by xhat_j / (M sigma)), so
        dx = gamma / sigma * (dy - mean(dy) - xhat * mean(dy * xhat)).
    Evaluation: mu, sigma are constants, so dx = gamma / sigma * dy.
    Long form: docs/backprop.md#batch-normalisation.
    """
    if cache[0]:
        _, xhat, gamma, inv_std = cache
        M = dy.size // dy.shape[1]
        dbeta = channel_sum(dy)
        dgamma = channel_dot(dy, xhat)
        # dx = (gamma * inv_std) * (dy - dbeta / M - xhat * dgamma / M), built in one new buffer
        dx = xhat * per_channel(dgamma / M)
        np.subtract(dy, dx, out=dx)
        dx -= per_channel(dbeta / M)
        dx *= per_channel(inv_std if gamma is None else gamma * inv_std)
        return dx, dgamma, dbeta
    _, x, gamma, inv_std, mean = cache
    dbeta = channel_sum(dy)
    xhat = x - per_channel(mean)
    xhat *= per_channel(inv_std)
    dgamma = channel_dot(dy, xhat)
    scale = inv_std if gamma is None else gamma * inv_std
    dx = dy * per_channel(scale.astype(dy.dtype, copy=False))
    return dx, dgamma, dbeta


class BatchNorm2d(Module):
    """Batch normalisation over (N, C, H, W), per channel, as torch.nn.BatchNorm2d.

    Training: normalise with the batch's mean and biased variance; update running_mean and
    running_var (the UNBIASED variance, M/(M-1) times the biased one) as
    r = (1 - momentum) r + momentum * batch, or as a cumulative average when momentum is None;
    count num_batches_tracked. Evaluation: normalise with the running statistics (a fixed affine
    map, whose backward is exact too). track_running_stats=False: always the batch's statistics.
    Parameters weight (gamma, ones) and bias (beta, zeros) when affine; buffers running_mean,
    running_var (dtype of the layer) and num_batches_tracked (int64, shape ()).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 dtype=None, backend="numpy"):
        super().__init__(backend=backend, dtype=dtype)
        if isinstance(num_features, (bool, np.bool_)) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"BatchNorm2d: num_features must be an int, got {num_features!r}")
        if num_features < 1:
            raise ValueError(f"BatchNorm2d: num_features must be positive, got {num_features}")
        if not isinstance(eps, (int, float, np.floating, np.integer)) or not eps > 0:
            raise ValueError(f"BatchNorm2d: eps must be a positive number, got {eps!r}")
        if momentum is not None and (not isinstance(momentum, (int, float, np.floating, np.integer))
                                     or not 0 <= momentum <= 1):
            raise ValueError(f"BatchNorm2d: momentum must be in [0, 1] or None, got {momentum!r}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        C, dt = self.num_features, self.dtype
        if self.affine:
            self.weight = Parameter(self.backend.asarray(np.ones(C, dtype=dt)))
            self.bias = Parameter(self.backend.asarray(np.zeros(C, dtype=dt)))
        else:
            self.weight = self.bias = None
        if self.track_running_stats:
            self.register_buffer("running_mean", self.backend.asarray(np.zeros(C, dtype=dt)))
            self.register_buffer("running_var", self.backend.asarray(np.ones(C, dtype=dt)))
            self.register_buffer("num_batches_tracked",
                                 self.backend.asarray(np.zeros((), dtype=np.int64)))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def forward(self, x):
        x = check_input("BatchNorm2d", x, channels=self.num_features, xp=self.xp, dtype=self.dtype)
        use_batch = self.training or not self.track_running_stats
        M = x.size // x.shape[1]
        if use_batch and M < 2:
            raise ValueError(f"BatchNorm2d: expected more than 1 value per channel when training "
                             f"(batch statistics), got input shape {tuple(x.shape)}")
        gamma = self.weight.data if self.affine else None
        beta = self.bias.data if self.affine else None
        y, cache, mu, var = self.ops.batchnorm2d_forward(x, gamma, beta, self.running_mean,
                                                         self.running_var, self.eps, use_batch)
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
            if self.momentum is None:        # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
            self.running_mean *= 1 - factor
            self.running_mean += factor * mu
            self.running_var *= 1 - factor
            self.running_var += (factor * M / (M - 1)) * var
        self._keep(cache)
        return y

    def backward(self, dy):
        cache = self._take()
        dy = self.xp.asarray(dy)
        xshape = tuple(cache[1].shape)
        if tuple(dy.shape) != xshape:
            raise ValueError(f"BatchNorm2d: backward expected dy of shape {xshape}, got "
                             f"{tuple(dy.shape)}")
        dx, dgamma, dbeta = self.ops.batchnorm2d_backward(dy, cache)
        if self.affine:
            self.weight.add_grad(dgamma)
            self.bias.add_grad(dbeta)
        self._release()
        return dx

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")
