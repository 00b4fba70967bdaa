"""The models, built from unet_np.nn only."""
from .attention_unet import AttentionGate, AttentionUNet
from .base import ARCHITECTURES, SegmentationModel, load_model
from .builder import GeneralUNet
from .unet import UNet
from .unet_plus_plus import UNetPlusPlus
