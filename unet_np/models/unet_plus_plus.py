"""U-Net++ (Zhou, Siddiquee, Tajbakhsh, Liang 2018): nested, dense skip pathways.

Node X[i][j] sits at level i (resolution H/2^i) and column j. Column 0 is the encoder:
    X[0][0] = block(x),  X[i][0] = block(pool(X[i-1][0])).
Every other node takes all earlier nodes of its level and the upsampled node below-left:
    X[i][j] = block(cat[up(X[i+1][j-1]), X[i][0], ..., X[i][j-1]]).
The top row X[0][1..D] gives D outputs (1x1 convolutions). With deep supervision all of them are
trained (the loss averaged over them) and at inference the network can be pruned to level L < D:
only nodes with i + j <= L are computed and the output of X[0][L] is used.
"""
import numpy as np

from ..nn import Concat, Conv2d, Conv3d
from .base import Block, SegmentationModel, check_common, check_range, register
from .unet import check_spatial_dims, max_pool, up_layer


@register("unet++")
class UNetPlusPlus(SegmentationModel):
    """UNetPlusPlus(in_channels, num_classes, depth=4, base_channels=32, deep_supervision=False, ...).

    forward(x) returns the logits of X[0][D] (or of X[0][L] when pruned with ``prune(L)``); with
    deep_supervision=True in training mode it returns a LIST of D logits (X[0][1], ..., X[0][D]) and
    backward takes a list of D gradients (see unet_np.train for the averaged loss).
    spatial_dims=3: the same on volumes (N, C, D, H, W), as UNet's.
    """

    def __init__(self, in_channels, num_classes, depth=4, base_channels=32, deep_supervision=False,
                 batchnorm=False, upsample="transpose", init="torch", pad_input=False, dtype=None,
                 backend="numpy", spatial_dims=2):
        super().__init__(backend=backend, dtype=dtype)
        check_common(in_channels, num_classes, depth, base_channels, upsample, init)
        self.spatial_dims = dims = check_spatial_dims(spatial_dims)
        self._config = dict(in_channels=in_channels, num_classes=num_classes, depth=depth,
                            base_channels=base_channels, deep_supervision=bool(deep_supervision),
                            batchnorm=bool(batchnorm), upsample=upsample, init=init,
                            pad_input=bool(pad_input))
        if dims == 3:
            self._config["spatial_dims"] = 3
        self.in_channels, self.num_classes, self.depth = in_channels, num_classes, depth
        self.deep_supervision, self.pad_input = bool(deep_supervision), bool(pad_input)
        self.level = depth  # inference level (prune)
        ch = [base_channels * 2 ** i for i in range(depth + 1)]
        self.channels = ch
        kw = dict(padding="same", batchnorm=batchnorm, init=init, dtype=dtype, backend=backend,
                  spatial_dims=dims)
        # Parameters registered column by column, top to bottom: the order the forward visits nodes.
        for j in range(depth + 1):
            for i in range(depth + 1 - j):
                if j == 0:
                    setattr(self, f"x{i}_0", Block(in_channels if i == 0 else ch[i - 1], ch[i], **kw))
                    if i < depth:
                        setattr(self, f"pool{i}", max_pool(dims, backend))
                else:
                    setattr(self, f"up{i}_{j}", up_layer(ch[i + 1], ch[i], upsample, init, dtype, backend,
                                                         dims))
                    setattr(self, f"cat{i}_{j}", Concat(axis=1, backend=backend))
                    setattr(self, f"x{i}_{j}", Block((j + 1) * ch[i], ch[i], **kw))
        for j in range(1, depth + 1):
            if deep_supervision or j == depth:
                setattr(self, f"final{j}", (Conv2d if dims == 2 else Conv3d)(
                    ch[0], num_classes, 1, init=init, dtype=dtype, backend=backend))

    def prune(self, level=None):
        """Use only the sub-network up to ``level`` (1..depth) at inference; None restores the full
        network. Needs deep supervision (only then is every top-row output trained)."""
        if level is None:
            self.level = self.depth
            return self
        check_range("level", level, 1, self.depth)
        if level != self.depth and not self.deep_supervision:
            raise ValueError("pruning needs a model trained with deep_supervision=True: only then does "
                             f"X[0][{level}] have a trained output layer")
        self.level = level
        return self

    def _heads(self):
        L = self.level
        if self.training and self.deep_supervision and L == self.depth:
            return list(range(1, self.depth + 1))
        return [L]

    def activation_bytes(self, shape):
        n = shape[0]
        voxels, shrink = float(np.prod(shape[2:])), 2 ** len(shape[2:])
        total = 0
        for i, ch in enumerate(self.channels):
            hw = voxels / shrink ** i
            cols = self.depth + 1 - i
            total += cols * (9 * (cols + 1) * ch + 9 * ch + 6 * ch) * hw
        return int(total * n * self.dtype.itemsize)

    def _forward(self, x):
        # x: (N, C_in, H, W); nodes X[i][j]: (N, ch[i], H/2^i, W/2^i)
        X = {}
        L = self.level
        h = self._pad(x)
        for j in range(L + 1):
            for i in range(L + 1 - j):
                if j == 0:
                    src = h if i == 0 else getattr(self, f"pool{i - 1}").forward(X[i - 1, 0])
                    X[i, 0] = getattr(self, f"x{i}_0").forward(src)
                else:
                    up = getattr(self, f"up{i}_{j}").forward(X[i + 1, j - 1])
                    cat = getattr(self, f"cat{i}_{j}").forward(up, *[X[i, k] for k in range(j)])
                    X[i, j] = getattr(self, f"x{i}_{j}").forward(cat)
        self._heads_used = self._heads()
        outs = [self._crop(getattr(self, f"final{j}").forward(X[0, j])) for j in self._heads_used]
        return outs if len(outs) > 1 else outs[0]

    def _backward(self, dlogits):
        """dlogits: one array (N, num_classes, H, W), or a list with one per output of forward.
        Visits the nodes in the reverse of the forward's order, summing each node's gradient over
        every path it fed (the heads, the node to its right, the dense skips, the node above-right)."""
        grads = dlogits if isinstance(dlogits, (list, tuple)) else [dlogits]
        if len(grads) != len(self._heads_used):
            raise ValueError(f"UNetPlusPlus.backward: expected {len(self._heads_used)} gradients "
                             f"(one per output), got {len(grads)}")
        L = self.level
        dX = {}

        def add(key, g):
            dX[key] = g if key not in dX else dX[key] + g

        for j, g in zip(self._heads_used, grads):
            add((0, j), getattr(self, f"final{j}").backward(self._uncrop(g)))
        d_input = None
        for j in range(L, -1, -1):
            for i in range(L - j, -1, -1):
                g = dX.pop((i, j))
                if j == 0:
                    g = getattr(self, f"x{i}_0").backward(g)
                    if i == 0:
                        d_input = g
                    else:
                        add((i - 1, 0), getattr(self, f"pool{i - 1}").backward(g))
                else:
                    g = getattr(self, f"x{i}_{j}").backward(g)
                    parts = getattr(self, f"cat{i}_{j}").backward(g)
                    add((i + 1, j - 1), getattr(self, f"up{i}_{j}").backward(parts[0]))
                    for k in range(j):
                        add((i, k), parts[k + 1])
        return d_input
