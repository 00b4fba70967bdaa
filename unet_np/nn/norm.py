"""Normalisation layers: BatchNorm2d/3d, InstanceNorm2d/3d, GroupNorm.

Primitives (plain NumPy):

    batchnorm2d_forward(x, gamma, beta, mean, var, eps, training)
        -> (y, cache, batch_mean, batch_var)
    batchnorm2d_backward(dy, cache) -> (dx, dgamma, dbeta)

In training the statistics are the batch's own (per channel over N, H, W; the biased variance
normalises) and the backward differentiates through them; in evaluation ``mean`` and ``var`` (the
running statistics) are constants and the layer is a fixed per-channel affine map. The layer class
owns the running statistics and their momentum update; the primitives are pure functions.
Derivation in long form: docs/backprop.md#batch-normalisation.

The other layers reuse these two primitives by reshaping, so every backend that has them runs all
five layers (x is (N, C, *spatial), L = the product of the spatial sizes):
    BatchNorm3d:   (N, C, D, H, W) -> (N, C, D*H, W): the same per-channel statistics.
    InstanceNorm:  (N, C, L) -> (1, N*C, L, 1): each (sample, channel) is a "channel" of one batch.
    GroupNorm:     (N, C, L) -> (1, N*G, (C/G)*L, 1): each (sample, group) is one; the affine map
                   is per channel, so it is applied outside the primitive.
Long form: docs/backprop.md#instance-and-group-normalisation.
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
        init_norm_state(self, num_features, eps, momentum, affine, track_running_stats)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    NDIM = 4          # the input's rank: (N, C, H, W); BatchNorm3d sets 5

    def forward(self, x):
        name = type(self).__name__
        x = check_input(name, x, ndim=self.NDIM, channels=self.num_features, xp=self.xp,
                        dtype=self.dtype)
        shape = tuple(x.shape)
        x = x.reshape(shape[0], shape[1], -1, shape[-1])      # (N, C, D*H, W): a no-op in 2-D
        use_batch = self.training or not self.track_running_stats
        M = x.size // x.shape[1]
        if use_batch and M < 2:
            raise ValueError(f"{name}: expected more than 1 value per channel when training "
                             f"(batch statistics), got input shape {shape}")
        gamma = self.weight.data if self.affine else None
        beta = self.bias.data if self.affine else None
        y, cache, mu, var = self.ops.batchnorm2d_forward(x, gamma, beta, self.running_mean,
                                                         self.running_var, self.eps, use_batch)
        y = y.reshape(shape)
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
        self._keep((cache, shape))
        return y

    def backward(self, dy):
        cache, shape = self._take()
        dy = self.xp.asarray(dy)
        if tuple(dy.shape) != shape:
            raise ValueError(f"{type(self).__name__}: backward expected dy of shape {shape}, got "
                             f"{tuple(dy.shape)}")
        dy = dy.reshape(shape[0], shape[1], -1, shape[-1])
        dx, dgamma, dbeta = self.ops.batchnorm2d_backward(dy, cache)
        if self.affine:
            self.weight.add_grad(dgamma)
            self.bias.add_grad(dbeta)
        self._release()
        return dx.reshape(shape)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class BatchNorm3d(BatchNorm2d):
    """Batch normalisation over (N, C, D, H, W), per channel, as torch.nn.BatchNorm3d.

    The statistics are per channel over N, D, H and W: the same maths as BatchNorm2d on the input
    viewed as (N, C, D*H, W), which is exactly what it does (same parameters, buffers and backward).
    """

    NDIM = 5


def check_features(owner, num_features, eps, momentum):
    """The constructor checks InstanceNorm and GroupNorm share with BatchNorm2d: a clear error."""
    if isinstance(num_features, (bool, np.bool_)) or not isinstance(num_features, (int, np.integer)):
        raise TypeError(f"{owner}: num_features must be an int, got {num_features!r}")
    if num_features < 1:
        raise ValueError(f"{owner}: num_features must be positive, got {num_features}")
    if not isinstance(eps, (int, float, np.floating, np.integer)) or not eps > 0:
        raise ValueError(f"{owner}: eps must be a positive number, got {eps!r}")
    if momentum is not None and (not isinstance(momentum, (int, float, np.floating, np.integer))
                                 or not 0 <= momentum <= 1):
        raise ValueError(f"{owner}: momentum must be in [0, 1] or None, got {momentum!r}")


def init_norm_state(layer, num_features, eps, momentum, affine, track_running_stats):
    """The state BatchNorm and InstanceNorm share, after check_features: weight (ones) and bias
    (zeros) Parameters when affine, running_mean / running_var / num_batches_tracked buffers when
    track_running_stats (None otherwise)."""
    check_features(type(layer).__name__, num_features, eps, momentum)
    layer.num_features, layer.eps = int(num_features), float(eps)
    layer.momentum = None if momentum is None else float(momentum)
    layer.affine, layer.track_running_stats = bool(affine), bool(track_running_stats)
    C, dt = layer.num_features, layer.dtype
    if layer.affine:
        layer.weight = Parameter(layer.backend.asarray(np.ones(C, dtype=dt)))
        layer.bias = Parameter(layer.backend.asarray(np.zeros(C, dtype=dt)))
    else:
        layer.weight = layer.bias = None
    if layer.track_running_stats:
        layer.register_buffer("running_mean", layer.backend.asarray(np.zeros(C, dtype=dt)))
        layer.register_buffer("running_var", layer.backend.asarray(np.ones(C, dtype=dt)))
        layer.register_buffer("num_batches_tracked", layer.backend.asarray(np.zeros((), dtype=np.int64)))
    else:
        layer.running_mean = layer.running_var = layer.num_batches_tracked = None


class InstanceNorm2d(Module):
    """Instance normalisation, as torch.nn.InstanceNorm2d: every (sample, channel) plane is
    normalised by its own mean and biased variance over the spatial axes, then (affine) scaled by
    weight[c] and shifted by bias[c].

    x: (N, C, *spatial) -> y: same shape. With L spatial values per plane this is batch
    normalisation of the input viewed as (1, N*C, L, 1) with weight and bias repeated N times, so
    it calls the backend's batchnorm2d primitives; the gradient of the repeated weight is summed over
    the N copies (dweight[c] = sum_n sum_l dy * xhat, dbias[c] = sum_n sum_l dy).

    track_running_stats=True (as PyTorch): training still uses each plane's own statistics and
    updates running_mean / running_var with the MEAN over the batch of the planes' means and unbiased
    variances (r = (1 - momentum) r + momentum * that; momentum=None leaves them unchanged, as
    PyTorch's InstanceNorm does); evaluation then normalises with the running statistics (a fixed
    per-channel affine map). num_batches_tracked is a buffer, as in PyTorch, and stays 0.
    Defaults follow PyTorch: affine=False, track_running_stats=False.
    """

    NDIM = 4

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False,
                 dtype=None, backend="numpy"):
        super().__init__(backend=backend, dtype=dtype)
        init_norm_state(self, num_features, eps, momentum, affine, track_running_stats)

    def forward(self, x):
        name = type(self).__name__
        x = check_input(name, x, ndim=self.NDIM, channels=self.num_features, xp=self.xp,
                        dtype=self.dtype)
        shape = tuple(x.shape)
        N, C = shape[:2]
        L = x.size // (N * C)
        gamma = self.weight.data if self.affine else None
        beta = self.bias.data if self.affine else None
        if self.training or not self.track_running_stats:
            if L < 2:
                raise ValueError(f"{name}: expected more than 1 spatial value per channel, got input "
                                 f"shape {shape}")
            xp = self.xp
            g = None if gamma is None else xp.tile(gamma, N)            # (N*C,)
            b = None if beta is None else xp.tile(beta, N)
            # (1, N*C, L, 1): one "channel" per (sample, channel) plane
            y, cache, mu, var = self.ops.batchnorm2d_forward(x.reshape(1, N * C, L, 1), g, b, None,
                                                             None, self.eps, True)
            if self.training and self.track_running_stats and self.momentum is not None:
                m = self.momentum
                self.running_mean *= 1 - m
                self.running_mean += m * mu.reshape(N, C).mean(axis=0)
                self.running_var *= 1 - m
                self.running_var += (m * L / (L - 1)) * var.reshape(N, C).mean(axis=0)
            self._keep(("instance", cache, shape))
        else:
            # evaluation with running statistics: per-channel constants, as BatchNorm2d in eval
            y, cache, _, _ = self.ops.batchnorm2d_forward(x.reshape(N, C, L, 1), gamma, beta,
                                                          self.running_mean, self.running_var,
                                                          self.eps, False)
            self._keep(("running", cache, shape))
        return y.reshape(shape)

    def backward(self, dy):
        kind, cache, shape = self._take()
        dy = self.xp.asarray(dy)
        if tuple(dy.shape) != shape:
            raise ValueError(f"{type(self).__name__}: backward expected dy of shape {shape}, got "
                             f"{tuple(dy.shape)}")
        N, C = shape[:2]
        L = dy.size // (N * C)
        if kind == "instance":
            # in the forward: y[n, c] = bn(x[n, c]) with weight[c] repeated for every n; so the
            # repeated weight's gradients add up over n
            dx, dg, db = self.ops.batchnorm2d_backward(dy.reshape(1, N * C, L, 1), cache)
            dg, db = dg.reshape(N, C).sum(axis=0), db.reshape(N, C).sum(axis=0)
        else:
            dx, dg, db = self.ops.batchnorm2d_backward(dy.reshape(N, C, L, 1), cache)
        if self.affine:
            self.weight.add_grad(dg)
            self.bias.add_grad(db)
        self._release()
        return dx.reshape(shape)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class InstanceNorm3d(InstanceNorm2d):
    """InstanceNorm2d on (N, C, D, H, W): each (sample, channel) volume by its own statistics."""

    NDIM = 5


class GroupNorm(Module):
    """Group normalisation, as torch.nn.GroupNorm(num_groups, num_channels, eps, affine).

    x: (N, C, *spatial), any number of spatial axes -> y: same shape. The C channels fall into
    G = num_groups groups of C/G consecutive channels; each (sample, group) is normalised by its own
    mean and biased variance over its (C/G)*L values (training and evaluation alike: there are no
    running statistics), then y = xhat * weight[c] + bias[c] per channel.

    Forward: xhat = batch normalisation (no affine) of x viewed as (1, N*G, (C/G)*L, 1).
    Backward: dbias[c] = sum_{n,l} dy, dweight[c] = sum_{n,l} dy * xhat, dxhat = dy * weight[c], and
    dx = the batchnorm backward of dxhat (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sigma
    per group.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, dtype=None, backend="numpy"):
        super().__init__(backend=backend, dtype=dtype)
        check_features("GroupNorm", num_channels, eps, None)
        if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
            raise ValueError(f"GroupNorm: num_groups must be a positive int, got {num_groups!r}")
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels ({num_channels}) must be divisible by "
                             f"num_groups ({num_groups})")
        self.num_groups, self.num_channels = int(num_groups), int(num_channels)
        self.eps, self.affine = float(eps), bool(affine)
        C, dt = self.num_channels, self.dtype
        if self.affine:
            self.weight = Parameter(self.backend.asarray(np.ones(C, dtype=dt)))
            self.bias = Parameter(self.backend.asarray(np.zeros(C, dtype=dt)))
        else:
            self.weight = self.bias = None

    def forward(self, x):
        x = check_input("GroupNorm", x, ndim=None, channels=self.num_channels, xp=self.xp,
                        dtype=self.dtype)
        if x.ndim < 2:
            raise ValueError(f"GroupNorm: expected (N, C, *spatial), got shape {tuple(x.shape)}")
        shape = tuple(x.shape)
        N, C, G = shape[0], shape[1], self.num_groups
        L = x.size // (N * C)
        if (C // G) * L < 2:
            raise ValueError(f"GroupNorm: expected more than 1 value per group, got input shape {shape}")
        xhat, cache, _, _ = self.ops.batchnorm2d_forward(x.reshape(1, N * G, (C // G) * L, 1), None,
                                                         None, None, None, self.eps, True)
        xhat = xhat.reshape(N, C, L)                                       # (N, C, L)
        if self.affine:
            y = xhat * self.weight.data.reshape(1, C, 1)
            y += self.bias.data.reshape(1, C, 1)
        else:
            y = xhat.copy()
        self._keep((cache, xhat if self.affine else None, shape))
        return y.reshape(shape)

    def backward(self, dy):
        cache, xhat, shape = self._take()
        dy = self.xp.asarray(dy)
        if tuple(dy.shape) != shape:
            raise ValueError(f"GroupNorm: backward expected dy of shape {shape}, got {tuple(dy.shape)}")
        N, C, G = shape[0], shape[1], self.num_groups
        dy = dy.reshape(N, C, -1)                                          # (N, C, L)
        if self.affine:
            # in the forward: y = xhat * weight[c] + bias[c]
            self.bias.add_grad(dy.sum(axis=(0, 2)))
            self.weight.add_grad((dy * xhat).sum(axis=(0, 2)))
            dxhat = dy * self.weight.data.reshape(1, C, 1)
        else:
            dxhat = dy
        dx, _, _ = self.ops.batchnorm2d_backward(dxhat.reshape(1, N * G, -1, 1), cache)
        self._release()
        return dx.reshape(shape)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
