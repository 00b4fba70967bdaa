"""Attention U-Net (Oktay et al. 2018): a U-Net whose skip connections pass through additive attention
gates, so the decoder can suppress skip features in irrelevant regions.

Gate at level l, skip x (N, C_x, H, W) and gating signal g (N, C_g, H/2, W/2) from the level below:
    q     = relu(theta(x) + up(phi(g)))       theta, phi: 1x1 convolutions to C_int channels,
                                              up: bilinear x2 (resampling g's grid to x's)
    alpha = sigmoid(psi(q))                   psi: 1x1 convolution to one channel, (N, 1, H, W)
    out   = alpha * x                         broadcast over the channels
Backward (written out in AttentionGate.backward):
    d_alpha = sum_c dout * x,   dx = dout * alpha + theta^T(dq_pre),   dg = phi^T(up^T(dq_pre))
with dq_pre = relu'(.) * psi^T(sigmoid'(.) * d_alpha).
"""
import numpy as np

from ..nn import Concat, Conv2d, Conv3d, ReLU, Sigmoid, Upsample
from ..nn.module import Module
from .base import Block, SegmentationModel, check_common, register
from .unet import check_spatial_dims, max_pool, up_layer


class AttentionGate(Module):
    """Additive attention gate. forward(x, g) -> alpha * x;  backward(dout) -> (dx, dg)."""

    def __init__(self, x_channels, g_channels, inter_channels, init="torch", dtype=None, backend="numpy",
                 spatial_dims=2):
        super().__init__(backend=backend, dtype=dtype)
        kw = dict(init=init, dtype=dtype, backend=backend)
        Conv = Conv2d if spatial_dims == 2 else Conv3d          # 1x1 (1x1x1) convolutions
        self.theta = Conv(x_channels, inter_channels, 1, bias=False, **kw)
        self.phi = Conv(g_channels, inter_channels, 1, **kw)
        self.psi = Conv(inter_channels, 1, 1, **kw)
        self.up = Upsample(scale_factor=2, mode="bilinear" if spatial_dims == 2 else "trilinear",
                           backend=backend)
        self.relu = ReLU(backend=backend)
        self.sigmoid = Sigmoid(backend=backend)

    def forward(self, x, g):
        # x: (N, Cx, H, W), g: (N, Cg, H/2, W/2)
        q = self.relu.forward(self.theta.forward(x) + self.up.forward(self.phi.forward(g)))  # (N, Ci, H, W)
        alpha = self.sigmoid.forward(self.psi.forward(q))                                  # (N, 1, H, W)
        self._keep((x, alpha))
        self.alpha = alpha
        return alpha * x

    def backward(self, dout):
        # dout: (N, Cx, H, W) -> dx (N, Cx, H, W), dg (N, Cg, H/2, W/2)
        x, alpha = self._take()
        dx = dout * alpha                                   # through the product, x's direct path
        d_alpha = (dout * x).sum(axis=1, keepdims=True)     # alpha was broadcast over channels: sum
        dq = self.relu.backward(self.psi.backward(self.sigmoid.backward(d_alpha)))
        dx = dx + self.theta.backward(dq)                   # theta(x) + up(phi(g)): the sum copies dq
        dg = self.phi.backward(self.up.backward(dq))
        self._release()
        return dx, dg


@register("attention")
class AttentionUNet(SegmentationModel):
    """AttentionUNet(in_channels, num_classes, depth=4, base_channels=64, ...): a 'same'-padded U-Net
    with an AttentionGate on every skip connection. ``gate{i}.alpha`` holds the last attention map.
    spatial_dims=3: the same on volumes (N, C, D, H, W), as UNet's."""

    def __init__(self, in_channels, num_classes, depth=4, base_channels=64, batchnorm=False,
                 upsample="transpose", init="torch", pad_input=False, dtype=None, backend="numpy",
                 spatial_dims=2):
        super().__init__(backend=backend, dtype=dtype)
        check_common(in_channels, num_classes, depth, base_channels, upsample, init)
        self.spatial_dims = dims = check_spatial_dims(spatial_dims)
        self._config = dict(in_channels=in_channels, num_classes=num_classes, depth=depth,
                            base_channels=base_channels, batchnorm=bool(batchnorm), upsample=upsample,
                            init=init, pad_input=bool(pad_input))
        if dims == 3:
            self._config["spatial_dims"] = 3
        self.in_channels, self.num_classes, self.depth = in_channels, num_classes, depth
        self.pad_input = bool(pad_input)
        ch = [base_channels * 2 ** i for i in range(depth + 1)]
        self.channels = ch
        kw = dict(padding="same", batchnorm=batchnorm, init=init, dtype=dtype, backend=backend,
                  spatial_dims=dims)
        for i in range(1, depth + 1):
            setattr(self, f"enc{i}", Block(in_channels if i == 1 else ch[i - 2], ch[i - 1], **kw))
        self.bottleneck = Block(ch[depth - 1], ch[depth], **kw)
        for i in range(depth, 0, -1):
            setattr(self, f"gate{i}", AttentionGate(ch[i - 1], ch[i], max(1, ch[i - 1] // 2), init=init,
                                                    dtype=dtype, backend=backend, spatial_dims=dims))
            setattr(self, f"up{i}", up_layer(ch[i], ch[i - 1], upsample, init, dtype, backend, dims))
            setattr(self, f"cat{i}", Concat(axis=1, backend=backend))
            setattr(self, f"dec{i}", Block(2 * ch[i - 1], ch[i - 1], **kw))
        self.final = (Conv2d if dims == 2 else Conv3d)(ch[0], num_classes, 1, init=init, dtype=dtype,
                                                       backend=backend)
        for i in range(1, depth + 1):
            setattr(self, f"pool{i}", max_pool(dims, backend))

    def activation_bytes(self, shape):
        n, c = shape[:2]
        voxels, shrink = float(np.prod(shape[2:])), 2 ** len(shape[2:])
        total = 0
        for level, ch in enumerate(self.channels):
            hw = voxels / shrink ** level
            total += (9 * (c if level == 0 else self.channels[level - 1]) + 9 * ch + 4 * ch) * hw
            if level < self.depth:
                total += (18 * ch + 9 * ch + 12 * ch) * hw
        return int(total * n * self.dtype.itemsize)

    def _forward(self, x):
        h = self._pad(x)
        skips = []
        for i in range(1, self.depth + 1):
            h = getattr(self, f"enc{i}").forward(h)
            skips.append(h)
            h = getattr(self, f"pool{i}").forward(h)
        h = self.bottleneck.forward(h)
        for i in range(self.depth, 0, -1):
            gated = getattr(self, f"gate{i}").forward(skips[i - 1], h)   # g = the coarser map
            u = getattr(self, f"up{i}").forward(h)
            h = getattr(self, f"dec{i}").forward(getattr(self, f"cat{i}").forward(u, gated))
        return self._crop(self.final.forward(h))

    def _backward(self, dlogits):
        d = self.final.backward(self._uncrop(dlogits))
        dskips = [None] * self.depth
        for i in range(1, self.depth + 1):
            du, dgated = getattr(self, f"cat{i}").backward(getattr(self, f"dec{i}").backward(d))
            dskip, dg = getattr(self, f"gate{i}").backward(dgated)
            dskips[i - 1] = dskip
            d = getattr(self, f"up{i}").backward(du) + dg
        d = self.bottleneck.backward(d)
        for i in range(self.depth, 0, -1):
            d = getattr(self, f"enc{i}").backward(getattr(self, f"pool{i}").backward(d) + dskips[i - 1])
        return d
