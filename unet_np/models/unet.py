"""The U-Net (Ronneberger, Fischer, Brox 2015), any depth, skips on or off, padded or valid.

    enc1 -> pool1 -> enc2 -> ... -> pool_d -> bottleneck
    for level d .. 1:  up_l -> [crop skip_l] -> cat[up, skip_l] -> dec_l
    final 1x1 conv -> class scores per pixel

``UNet(1, 2, depth=2, base_channels=64)`` is the reference article's network, parameter for parameter,
and its state_dict names are those of that PyTorch code (enc1.conv.0.weight, ..., final.bias).
"""
import numpy as np

from ..nn import (CenterCrop, Concat, Conv2d, Conv3d, ConvTranspose2d, ConvTranspose3d, MaxPool2d,
                  MaxPool3d, Sequential, Upsample)
from .base import Block, SegmentationModel, check_common, check_choice, register


def up_layer(cin, cout, upsample, init, dtype, backend, spatial_dims=2):
    """x2 upsampling that halves the channels: a 2x2 (2x2x2) stride-2 transposed convolution, or
    bilinear (trilinear) x2 followed by a 1x1 (1x1x1) convolution."""
    if upsample == "transpose":
        ConvT = ConvTranspose2d if spatial_dims == 2 else ConvTranspose3d
        return ConvT(cin, cout, 2, stride=2, init=init, dtype=dtype, backend=backend)
    Conv = Conv2d if spatial_dims == 2 else Conv3d
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    return Sequential(Upsample(scale_factor=2, mode=mode, backend=backend),
                      Conv(cin, cout, 1, init=init, dtype=dtype, backend=backend))


def max_pool(spatial_dims, backend):
    """The U-Net's 2x2 (2x2x2) stride-2 max-pool."""
    return (MaxPool2d if spatial_dims == 2 else MaxPool3d)(2, backend=backend)


def check_spatial_dims(spatial_dims):
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 (images, (N, C, H, W)) or 3 (volumes, "
                         f"(N, C, D, H, W)), got {spatial_dims!r}")
    return int(spatial_dims)


@register("unet")
class UNet(SegmentationModel):
    """U-Net for semantic segmentation.

    in_channels, num_classes: image channels and classes (the output has num_classes score maps).
    depth: number of poolings (1..5); base_channels: channels of the first level, doubled per level.
    skip: keep the skip connections (False: the decoder block sees the upsampled map alone).
    padding: 'same' (output size = input size) or 'valid' (the paper's unpadded convolutions; skip maps
        are centre-cropped before concatenation and the output is smaller: see output_shape).
    batchnorm: conv -> BN -> ReLU in every block. upsample: 'transpose' or 'bilinear'.
    init: 'torch' (PyTorch's default) or 'he' (the paper's He-normal). pad_input: reflect-pad inputs
        whose size is not a multiple of 2**depth and crop the output back ('same' only).
    spatial_dims: 2 for images (N, C, H, W); 3 for volumes (N, C, D, H, W), the 3D U-Net of Cicek et
        al. (2016): every layer its 3-D form (3x3x3 convolutions, 2x2x2 pooling and up-convolution,
        trilinear upsampling), with the 2-D network's parameter names and order.
    """

    def __init__(self, in_channels, num_classes, depth=4, base_channels=64, skip=True, padding="same",
                 batchnorm=False, upsample="transpose", init="torch", pad_input=False, dtype=None,
                 backend="numpy", spatial_dims=2):
        super().__init__(backend=backend, dtype=dtype)
        check_common(in_channels, num_classes, depth, base_channels, upsample, init)
        check_choice("padding", padding, ("same", "valid"))
        self.spatial_dims = dims = check_spatial_dims(spatial_dims)
        if pad_input and padding == "valid":
            raise ValueError("pad_input=True works with padding='same' only; for 'valid' use "
                             "valid_input_shape() to choose the input size")
        self._config = dict(in_channels=in_channels, num_classes=num_classes, depth=depth,
                            base_channels=base_channels, skip=bool(skip), padding=padding,
                            batchnorm=bool(batchnorm), upsample=upsample, init=init,
                            pad_input=bool(pad_input))
        if dims == 3:                       # (2-D checkpoints keep the config they always had)
            self._config["spatial_dims"] = 3
        self.in_channels, self.num_classes, self.depth = in_channels, num_classes, depth
        self.skip, self.padding, self.pad_input = bool(skip), padding, bool(pad_input)
        ch = [base_channels * 2 ** i for i in range(depth + 1)]
        self.channels = ch
        kw = dict(padding=padding, batchnorm=batchnorm, init=init, dtype=dtype, backend=backend,
                  spatial_dims=dims)
        # Registration order = parameter order of the reference network:
        # encoder blocks top down, the bottleneck, then per level bottom up: up-conv, decoder block.
        for i in range(1, depth + 1):
            setattr(self, f"enc{i}", Block(in_channels if i == 1 else ch[i - 2], ch[i - 1], **kw))
            setattr(self, f"pool{i}", max_pool(dims, backend))
        self.bottleneck = Block(ch[depth - 1], ch[depth], **kw)
        for i in range(depth, 0, -1):
            setattr(self, f"up{i}", up_layer(ch[i], ch[i - 1], upsample, init, dtype, backend, dims))
            setattr(self, f"dec{i}", Block(2 * ch[i - 1] if skip else ch[i - 1], ch[i - 1], **kw))
            if skip:
                setattr(self, f"cat{i}", Concat(axis=1, backend=backend))
                if padding == "valid":
                    setattr(self, f"crop{i}", CenterCrop(backend=backend))
        self.final = (Conv2d if dims == 2 else Conv3d)(ch[0], num_classes, 1, init=init, dtype=dtype,
                                                       backend=backend)

    # -- sizes ---------------------------------------------------------------------------------
    def _trace(self, s):
        """Spatial size through the network along one axis; None where a pooling would see an odd
        size or a size vanishes (valid padding)."""
        if self.padding == "same":
            return s if s % 2 ** self.depth == 0 else None
        for _ in range(self.depth):
            s -= 4
            if s <= 0 or s % 2:
                return None
            s //= 2
        s -= 4
        if s <= 0:
            return None
        for _ in range(self.depth):
            s = 2 * s - 4
        return s if s > 0 else None

    def output_shape(self, input_hw):
        """(H_out, W_out) ((D_out, H_out, W_out) for volumes) for an input of spatial size input_hw
        (ValueError if it is not valid)."""
        self.check_size(input_hw)
        if self.padding == "same":
            return tuple(int(s) for s in input_hw)
        return tuple(self._trace(int(s)) for s in input_hw)

    def valid_input_shape(self, min_hw):
        """The smallest valid input size (H, W) at least min_hw (for padding='valid' every pooling must
        see an even size; for 'same' the size must be a multiple of 2**depth)."""
        out = []
        for s in min_hw:
            s = max(int(s), 1)
            while self._trace(s) is None:
                s += 1
            out.append(s)
        return tuple(out)

    def check_size(self, hw):
        if self.padding == "same":
            return super().check_size(hw)
        bad = [s for s in hw if self._trace(int(s)) is None]
        if bad:
            s = int(bad[0])
            lo = s - 1
            while lo > 0 and self._trace(lo) is None:
                lo -= 1
            hi = self.valid_input_shape((s,))[0]
            near = f"{lo} or {hi}" if lo > 0 else f"{hi}"
            raise ValueError(f"UNet(padding='valid'): input size {tuple(hw)} does not fit: every pooling "
                             f"needs an even size; the nearest valid sizes for {s} are {near} "
                             f"(see valid_input_shape)")

    def activation_bytes(self, shape):
        """A rough estimate of what a forward keeps for the backward, with the tiled convolutions
        that keep only their input (the plain reference ones, unet_np.nn.conv_reference.FAST_PATHS off, keep
        9x more): per level, the encoder block's input and two ReLU outputs, the decoder's
        concatenation (2 ch), its ReLU outputs and the up-convolution's input. Measured: article
        network, batch 4, 256x256, estimate 765 MB, tracemalloc peak of a step 777 MiB."""
        n, c = shape[:2]
        voxels = float(np.prod(shape[2:]))            # H*W (D*H*W for a volume)
        shrink = 2 ** len(shape[2:])                   # each pooling divides it by 4 (8)
        total = 0
        for level, ch in enumerate(self.channels):
            hw = voxels / shrink ** level
            cin = c if level == 0 else self.channels[level - 1]
            total += (cin + 2 * ch) * hw                # encoder block / bottleneck
            if level < self.depth:
                total += 5 * ch * hw                    # concat (2 ch), two ReLUs, up-conv input
        return int(total * n * self.dtype.itemsize)

    # -- forward / backward ------------------------------------------------------------------
    def _forward(self, x):
        # x: (N, C_in, H, W) -> logits (N, num_classes, H_out, W_out)
        h = self._pad(x)
        skips = []
        for i in range(1, self.depth + 1):
            h = getattr(self, f"enc{i}").forward(h)          # (N, ch[i-1], H_i, W_i)
            skips.append(h)
            h = getattr(self, f"pool{i}").forward(h)         # (N, ch[i-1], H_i/2, W_i/2)
        h = self.bottleneck.forward(h)                       # (N, ch[d], H/2^d, W/2^d)
        for i in range(self.depth, 0, -1):
            h = getattr(self, f"up{i}").forward(h)           # (N, ch[i-1], 2*., 2*.)
            if self.skip:
                s = skips[i - 1]
                if self.padding == "valid":
                    s = getattr(self, f"crop{i}").forward(s, h.shape[2:])
                h = getattr(self, f"cat{i}").forward(h, s)   # [upsampled, skip]: (N, 2*ch[i-1], ...)
            h = getattr(self, f"dec{i}").forward(h)          # (N, ch[i-1], ...)
        return self._crop(self.final.forward(h))

    def _backward(self, dlogits):
        """dlogits: (N, num_classes, H_out, W_out) -> dx: (N, C_in, H, W). Runs the forward in reverse;
        the gradient reaching an encoder output is the sum of what comes back through the pooling and
        through its skip connection."""
        d = self.final.backward(self._uncrop(dlogits))
        dskips = [None] * self.depth
        for i in range(1, self.depth + 1):
            d = getattr(self, f"dec{i}").backward(d)
            if self.skip:
                d, ds = getattr(self, f"cat{i}").backward(d)
                if self.padding == "valid":
                    ds = getattr(self, f"crop{i}").backward(ds)
                dskips[i - 1] = ds
            d = getattr(self, f"up{i}").backward(d)
        d = self.bottleneck.backward(d)
        for i in range(self.depth, 0, -1):
            d = getattr(self, f"pool{i}").backward(d)
            if self.skip:
                d = d + dskips[i - 1]
            d = getattr(self, f"enc{i}").backward(d)
        return d
