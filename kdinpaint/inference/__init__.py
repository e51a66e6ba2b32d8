"""Running an inpainting model on real images: the inpainter, devices, memory, evaluation sets, files.

* :mod:`~kdinpaint.inference.inpainter` — :class:`Inpainter`: a checkpoint, an adapter's deployed student
  (:func:`deployed_model`) or a weight-free baseline, padded to its stride, batched and composited;
* :mod:`~kdinpaint.inference.device` — the default device and a named one checked to exist;
* :mod:`~kdinpaint.inference.memory` — a forward's peak memory measured at two small sizes, so an image that
  would not fit is refused with a message (:class:`InferenceOutOfMemory`) instead of the process being killed;
* :mod:`~kdinpaint.inference.timing` — wall-clock timing of device work, for the benchmarks;
* :mod:`~kdinpaint.inference.evaluate` — :func:`evaluate_model`: a network inpainting and scoring a set of images;
* :mod:`~kdinpaint.inference.masks` — :class:`GeneratedMasks`: evaluation masks spread over the Table 1 buckets;
* :mod:`~kdinpaint.inference.io` — image and mask files in and out.

Everything listed in ``__all__`` imports from here (``from kdinpaint.inference import Inpainter``). The floor, the
weight-free baselines scored beside a network, is :mod:`kdinpaint.evaluation.floor`; its old names here
(``evaluate_floor``, ``FLOOR_METHODS``, ...) still import, with a ``DeprecationWarning``.
"""

from kdinpaint import _moved
from kdinpaint.inference.device import default_device, resolve_device
from kdinpaint.inference.evaluate import evaluate_model
from kdinpaint.inference.inpainter import Inpainter, NonFiniteOutput, deployed_model
from kdinpaint.inference.io import load_image, load_mask, mask_to_rgb, save_image
from kdinpaint.inference.masks import GeneratedMasks, generated_masks
from kdinpaint.inference.memory import InferenceOutOfMemory, MemoryModel
# the padding helpers live in kdinpaint.padding; imported here, so the old import paths still work
from kdinpaint.padding import Crop, crop_top_left, pad_bottom_right, pad_to_multiple, unpad

__all__ = [
    "Crop",
    "InferenceOutOfMemory",
    "NonFiniteOutput",
    "Inpainter",
    "MemoryModel",
    "default_device",
    "resolve_device",
    "crop_top_left",
    "pad_bottom_right",
    "pad_to_multiple",
    "unpad",
    "deployed_model",
    "evaluate_model",
    "GeneratedMasks",
    "generated_masks",
    "load_image",
    "load_mask",
    "save_image",
    "mask_to_rgb",
]

__getattr__ = _moved.moved_names(__name__)  # the floor, now in kdinpaint.evaluation.floor
