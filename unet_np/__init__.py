"""unet_np: a U-Net for semantic segmentation with every forward and backward pass written by hand.

    import unet_np
    model = unet_np.UNet(1, 2, depth=2, base_channels=64)   # the reference article's network
    logits = model.forward(x)                              # x: (N, 1, H, W) float32
    dx = model.backward(dlogits)                           # gradients land in p.grad
"""
from . import backends, nn
from .backends import to_numpy
from .gradcheck import gradcheck
from .nn.init import seed
from .nn.module import no_grad
from .models import AttentionUNet, UNet, UNetPlusPlus, load_model

__version__ = "0.1.0"

__all__ = ["UNet", "UNetPlusPlus", "AttentionUNet", "load_model", "to_numpy", "backends", "nn",
           "optim", "gradcheck", "seed", "no_grad"]


def __getattr__(name):
    # optim and train are imported on first use (they are not needed to build or run a model).
    if name in ("optim", "train", "metrics", "checkpoint", "data"):
        import importlib
        return importlib.import_module(f"unet_np.{name}")
    raise AttributeError(f"module 'unet_np' has no attribute {name!r}")
