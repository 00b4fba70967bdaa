"""PyTorch reference networks: the oracles the unet_np models are checked against (tests only).

ArticleUNet is the reference article's code as it stands (2-level U-Net, 1 -> 2 classes).
TorchUNet, TorchUNetPlusPlus and TorchAttentionUNet are written here independently of unet_np, with the
same module names, so a state_dict can be exchanged in both directions.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class UNetBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(),
        )

    def forward(self, x):
        return self.conv(x)


class ArticleUNet(nn.Module):
    """The reference article's network, unchanged."""

    def __init__(self):
        super().__init__()
        self.enc1 = UNetBlock(1, 64)
        self.pool1 = nn.MaxPool2d(2)
        self.enc2 = UNetBlock(64, 128)
        self.pool2 = nn.MaxPool2d(2)
        self.bottleneck = UNetBlock(128, 256)
        self.up2 = nn.ConvTranspose2d(256, 128, kernel_size=2, stride=2)
        self.dec2 = UNetBlock(256, 128)
        self.up1 = nn.ConvTranspose2d(128, 64, kernel_size=2, stride=2)
        self.dec1 = UNetBlock(128, 64)
        self.final = nn.Conv2d(64, 2, kernel_size=1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool1(e1))
        b = self.bottleneck(self.pool2(e2))
        d2 = self.up2(b)
        d2 = self.dec2(torch.cat([d2, e2], dim=1))
        d1 = self.up1(d2)
        d1 = self.dec1(torch.cat([d1, e1], dim=1))
        return self.final(d1)


class Block(nn.Module):
    def __init__(self, cin, cout, padding="same", batchnorm=False, dims=2):
        super().__init__()
        pad = 1 if padding == "same" else 0
        Conv, BatchNorm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        layers = []
        for c in (cin, cout):
            layers.append(Conv(c, cout, 3, padding=pad))
            if batchnorm:
                layers.append(BatchNorm(cout))
            layers.append(nn.ReLU())
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return self.conv(x)


def up_layer(cin, cout, upsample, dims=2):
    if upsample == "transpose":
        return (nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d)(cin, cout, 2, stride=2)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear" if dims == 2 else "trilinear",
                                     align_corners=False),
                         (nn.Conv2d if dims == 2 else nn.Conv3d)(cin, cout, 1))


def center_crop(x, size):
    """The centre of x's spatial axes (2 or 3 of them) of the given size."""
    starts = [(n - s) // 2 for n, s in zip(x.shape[2:], size)]
    return x[(slice(None), slice(None)) + tuple(slice(a, a + s) for a, s in zip(starts, size))]


class TorchUNet(nn.Module):
    """dims=3: the 3D U-Net (Conv3d, BatchNorm3d, ConvTranspose3d, trilinear, max_pool3d)."""

    def __init__(self, cin, ncls, depth=4, base=64, skip=True, padding="same", batchnorm=False,
                 upsample="transpose", dims=2):
        super().__init__()
        self.depth, self.skip, self.padding, self.dims = depth, skip, padding, dims
        ch = [base * 2 ** i for i in range(depth + 1)]
        for i in range(1, depth + 1):
            setattr(self, f"enc{i}", Block(cin if i == 1 else ch[i - 2], ch[i - 1], padding, batchnorm,
                                           dims))
        self.bottleneck = Block(ch[depth - 1], ch[depth], padding, batchnorm, dims)
        for i in range(depth, 0, -1):
            setattr(self, f"up{i}", up_layer(ch[i], ch[i - 1], upsample, dims))
            setattr(self, f"dec{i}", Block(2 * ch[i - 1] if skip else ch[i - 1], ch[i - 1], padding,
                                           batchnorm, dims))
        self.final = (nn.Conv2d if dims == 2 else nn.Conv3d)(ch[0], ncls, 1)

    def forward(self, x):
        skips = []
        for i in range(1, self.depth + 1):
            x = getattr(self, f"enc{i}")(x)
            skips.append(x)
            x = (F.max_pool2d if self.dims == 2 else F.max_pool3d)(x, 2)
        x = self.bottleneck(x)
        for i in range(self.depth, 0, -1):
            x = getattr(self, f"up{i}")(x)
            if self.skip:
                x = torch.cat([x, center_crop(skips[i - 1], x.shape[2:])], dim=1)
            x = getattr(self, f"dec{i}")(x)
        return self.final(x)


class TorchUNetPlusPlus(nn.Module):
    def __init__(self, cin, ncls, depth=3, base=8, deep_supervision=False, batchnorm=False,
                 upsample="transpose", dims=2):
        super().__init__()
        self.depth, self.ds, self.dims = depth, deep_supervision, dims
        ch = [base * 2 ** i for i in range(depth + 1)]
        for j in range(depth + 1):
            for i in range(depth + 1 - j):
                if j == 0:
                    setattr(self, f"x{i}_0", Block(cin if i == 0 else ch[i - 1], ch[i], "same", batchnorm,
                                                   dims))
                else:
                    setattr(self, f"up{i}_{j}", up_layer(ch[i + 1], ch[i], upsample, dims))
                    setattr(self, f"x{i}_{j}", Block((j + 1) * ch[i], ch[i], "same", batchnorm, dims))
        for j in range(1, depth + 1):
            if deep_supervision or j == depth:
                setattr(self, f"final{j}", (nn.Conv2d if dims == 2 else nn.Conv3d)(ch[0], ncls, 1))

    def forward(self, x, level=None):
        L = level or self.depth
        X = {}
        for j in range(L + 1):
            for i in range(L + 1 - j):
                if j == 0:
                    pool = F.max_pool2d if self.dims == 2 else F.max_pool3d
                    src = x if i == 0 else pool(X[i - 1, 0], 2)
                    X[i, 0] = getattr(self, f"x{i}_0")(src)
                else:
                    up = getattr(self, f"up{i}_{j}")(X[i + 1, j - 1])
                    X[i, j] = getattr(self, f"x{i}_{j}")(torch.cat([up] + [X[i, k] for k in range(j)], 1))
        if self.ds and L == self.depth and self.training:
            return [getattr(self, f"final{j}")(X[0, j]) for j in range(1, L + 1)]
        return getattr(self, f"final{L}")(X[0, L])


class Gate(nn.Module):
    def __init__(self, cx, cg, ci, dims=2):
        super().__init__()
        Conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.mode = "bilinear" if dims == 2 else "trilinear"
        self.theta = Conv(cx, ci, 1, bias=False)
        self.phi = Conv(cg, ci, 1)
        self.psi = Conv(ci, 1, 1)

    def forward(self, x, g):
        up = F.interpolate(self.phi(g), scale_factor=2, mode=self.mode, align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(self.theta(x) + up)))
        return alpha * x


class TorchAttentionUNet(nn.Module):
    def __init__(self, cin, ncls, depth=3, base=8, batchnorm=False, upsample="transpose", dims=2):
        super().__init__()
        self.depth, self.dims = depth, dims
        ch = [base * 2 ** i for i in range(depth + 1)]
        for i in range(1, depth + 1):
            setattr(self, f"enc{i}", Block(cin if i == 1 else ch[i - 2], ch[i - 1], "same", batchnorm,
                                           dims))
        self.bottleneck = Block(ch[depth - 1], ch[depth], "same", batchnorm, dims)
        for i in range(depth, 0, -1):
            setattr(self, f"gate{i}", Gate(ch[i - 1], ch[i], max(1, ch[i - 1] // 2), dims))
            setattr(self, f"up{i}", up_layer(ch[i], ch[i - 1], upsample, dims))
            setattr(self, f"dec{i}", Block(2 * ch[i - 1], ch[i - 1], "same", batchnorm, dims))
        self.final = (nn.Conv2d if dims == 2 else nn.Conv3d)(ch[0], ncls, 1)

    def forward(self, x):
        skips = []
        for i in range(1, self.depth + 1):
            x = getattr(self, f"enc{i}")(x)
            skips.append(x)
            x = (F.max_pool2d if self.dims == 2 else F.max_pool3d)(x, 2)
        x = self.bottleneck(x)
        for i in range(self.depth, 0, -1):
            gated = getattr(self, f"gate{i}")(skips[i - 1], x)
            x = getattr(self, f"dec{i}")(torch.cat([getattr(self, f"up{i}")(x), gated], 1))
        return self.final(x)
