"""Data: image folders and file lists, mask sets and generators, bundled sample photos.

Everything yields toolkit conventions (:mod:`kdinpaint.masking`): images ``(3, H, W)`` in [-1, 1],
masks ``(1, H, W)`` with 1 = hole.
"""

from kdinpaint.data.dataset import InpaintingDataset
from kdinpaint.data.generators import EvalMasks, FreeFormMasks, MixedMasks, RectangleMasks, rng_for
from kdinpaint.data.images import IMAGE_EXTENSIONS, ImageFolder, list_images, read_image
from kdinpaint.data.masks import MaskFolder, detect_hole_colour, read_mask
from kdinpaint.data.samples import SAMPLE_NAMES, SampleCrops, sample_images, sample_photo
from kdinpaint.data.training import TrainingStream

__all__ = [
    "InpaintingDataset",
    "EvalMasks",
    "FreeFormMasks",
    "MixedMasks",
    "RectangleMasks",
    "rng_for",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "list_images",
    "read_image",
    "MaskFolder",
    "detect_hole_colour",
    "read_mask",
    "SAMPLE_NAMES",
    "SampleCrops",
    "sample_images",
    "sample_photo",
    "TrainingStream",
]
