"""Network architectures. A config's `model.architecture` picks a class from ARCHITECTURES.

Each class is built as ``cls(in_channels=<input slices>, num_classes=3, base_width=<width>)``.
"""

from models.unet import UNet

ARCHITECTURES = {"unet": UNet}
