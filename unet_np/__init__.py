"""unet_np: a U-Net for semantic segmentation with every forward and backward pass written by hand.

    import unet_np
    model = unet_np.UNet(1, 2, depth=2, base_channels=64)   # the reference article's network
    logits = model.forward(x)                              # x: (N, 1, H, W) float32
    dx = model.backward(dlogits)                           # gradients land in p.grad
    unet_np.save(model, "model.npz"); model = unet_np.load_model("model.npz")
    unet_np.export_onnx(model, "model.onnx")               # needs the onnx package

Dependencies point one way: nn <- models <- (checkpoint, onnx_export, train, infer, data) <- cli.
A model never imports the code that saves or exports it.
"""
from . import backends, nn
from .backends import to_numpy
from .checkpoint import save_model as save
from .gradcheck import gradcheck
from .nn.init import seed
from .nn.module import no_grad
from .models import AttentionUNet, UNet, UNetPlusPlus, load_model
from .onnx_export import export_onnx

__version__ = "0.1.0"

__all__ = ["UNet", "UNetPlusPlus", "AttentionUNet", "save", "load_model", "export_onnx", "to_numpy",
           "backends", "nn", "optim", "gradcheck", "seed", "no_grad"]


def __getattr__(name):
    # optim and train are imported on first use (they are not needed to build or run a model).
    if name in ("optim", "train", "metrics", "checkpoint", "data", "infer", "postprocess", "interop",
                "viz", "distributed"):
        import importlib
        return importlib.import_module(f"unet_np.{name}")
    raise AttributeError(f"module 'unet_np' has no attribute {name!r}")
