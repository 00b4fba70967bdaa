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


def make_backend():
    return Backend("numpy", np, reference_ops())
