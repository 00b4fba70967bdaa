"""Layers and losses, each with a hand-written forward and backward.

One file per family; each file begins with its plain NumPy primitives (the reference every backend
is checked against) and ends with the Module classes that call them through their backend.
"""
from . import activation, concat, conv, dropout, init, loss, norm, pool, upsample
from .module import Module, Parameter, Sequential, no_grad, is_grad_enabled
from .activation import LeakyReLU, ReLU, Sigmoid
from .loss import BCEWithLogitsLoss, CrossEntropyLoss, DiceLoss
from .conv import Conv2d, ConvTranspose2d, Conv3d, ConvTranspose3d
from .pool import MaxPool2d, MaxPool3d
from .upsample import Upsample
from .concat import Concat, CenterCrop, Pad2d, Pad3d
from .norm import BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm2d, InstanceNorm3d
from .dropout import Dropout, Dropout2d, Dropout3d

# The families whose OPS tuples make up the numpy backend's table of primitives.
FAMILIES = (activation, conv, pool, upsample, concat, norm, loss)
