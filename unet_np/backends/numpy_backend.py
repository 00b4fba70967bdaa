"""The reference backend: NumPy arrays and the plain primitives written beside each layer."""
import numpy as np

from . import Backend


def reference_ops():
    """name -> function for every primitive, collected from the ``OPS`` tuple of each layer family."""
    from ..nn import FAMILIES
    ops = {}
    for family in FAMILIES:
        for name in family.OPS:
            ops[name] = getattr(family, name)
    return ops


# Reference primitives written with NumPy calls only (the 3-D families). A backend on another array
# module (CuPy) that does not replace one of them runs it on the host (backends.host_fallback).
HOST_ONLY = ("conv3d_forward", "conv3d_backward", "conv_transpose3d_forward", "conv_transpose3d_backward",
             "maxpool3d_forward", "maxpool3d_backward",
             "upsample_trilinear3d_forward", "upsample_trilinear3d_backward",
             "upsample_nearest3d_forward", "upsample_nearest3d_backward",
             "pad3d_forward", "pad3d_backward")


def make_backend():
    return Backend("numpy", np, reference_ops())
