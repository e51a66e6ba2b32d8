"""Black-box teachers: a trained inpainting network that is only a function ``(image, mask) -> image``.

A TorchScript file (IOPaint ships big-lama as one), an ONNX file run by onnxruntime, or any Python callable
becomes a teacher of the toolkit's conventions with :func:`load_blackbox`::

    teacher = load_blackbox("big-lama.pt", range=[0, 1], channels="rgb", mask="hole_is_1")
    kd = kdinpaint.attach(student, teacher, kdinpaint.load_spec("reference").for_blackbox())

Nothing inside a black box can be hooked, so it teaches through its prediction only: the L1 between the
student's and its prediction in the holes at every decoder resolution (MI-GAN's recipe,
:func:`kdinpaint.losses.distillation.output_distillation`). :func:`kdinpaint.attach` refuses the terms that read
a teacher's features (cross-distillation, attention transfer, teacher levels for self-distillation's phi),
naming the spec fields to switch off; :meth:`kdinpaint.spec.AdapterSpec.for_blackbox` switches them off.

Conventions (:class:`BlackBoxConvention`): the value ``range`` of the images it takes and returns (``[0, 1]``,
``[-1, 1]`` or ``[0, 255]``), the channel order (``rgb`` | ``bgr``) and the mask (``hole_is_1`` | ``hole_is_0``).
IOPaint calls big-lama (``iopaint/model/lama.py``) with an RGB image ``(1, 3, H, W)`` float in ``[0, 1]`` and a
mask ``(1, 1, H, W)`` in {0, 1} with 1 = hole, sides padded to multiples of 8, and gets back the inpainted RGB
image in ``[0, 1]``: the default convention with ``multiple=8``. The wrapper converts the toolkit's image
(``[-1, 1]``, RGB, 1 = hole) to the declared convention, calls the function without gradient and converts its
answer back. A black box that returns another shape is refused at every call; one whose values leave its
declared range (or, declared ``[0, 255]`` or ``[-1, 1]``, that looks like a ``[0, 1]`` network) is refused at
its first call, the first batch of a training run, with the shapes and ranges named (declared ``[-1, 1]`` and
answering like a ``[0, 1]`` network, it is warned about: an untrained network may answer so too).

Loading: a ``.onnx`` file through onnxruntime (CPU unless ``providers`` says otherwise; inputs named ``image``
and ``mask``, else taken in order, each fed in the dtype the graph declares); any other file through
``torch.jit.load`` (TorchScript runs its own serialised code, not Python pickles). The wrapper is an ``nn.Module``
without parameters, buffers or ``state_dict`` entries: the function is held outside the module tree, and a
TorchScript or ``nn.Module`` function follows the input to its device at the first call there.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from kdinpaint.padding import crop_top_left, pad_bottom_right

__all__ = ["BlackBoxConvention", "BlackBoxTeacher", "load_blackbox", "is_blackbox", "RANGES", "CHANNELS", "MASKS"]

log = logging.getLogger(__name__)

RANGES: dict[str, tuple[float, float]] = {"[0, 1]": (0.0, 1.0), "[-1, 1]": (-1.0, 1.0), "[0, 255]": (0.0, 255.0)}
CHANNELS = ("rgb", "bgr")
MASKS = ("hole_is_1", "hole_is_0")
RANGE_SLACK = 0.02  # of the declared span: rounding, or a head without a final squashing, may step slightly out

RangeLike = Union[str, Sequence[float]]


def _parse_range(value: RangeLike) -> tuple[float, float]:
    if isinstance(value, str):
        text = value.replace(" ", "")
        for name, bounds in RANGES.items():
            if text == name.replace(" ", ""):
                return bounds
    elif isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        bounds = (float(value[0]), float(value[1]))
        if bounds in RANGES.values():
            return bounds
    raise ValueError(f"range {value!r} is not one of {list(RANGES)} (the values of the images the black box takes and returns)")


def _range_name(bounds: tuple[float, float]) -> str:
    return next(name for name, b in RANGES.items() if b == bounds)


@dataclass(frozen=True)
class BlackBoxConvention:
    """How a black box takes and returns images.

    Args:
        range: the value range of its input and output images: ``[0, 1]``, ``[-1, 1]`` or ``[0, 255]`` (a string
            or a pair of numbers).
        channels: ``rgb`` or ``bgr`` (OpenCV's order), for input and output.
        mask: ``hole_is_1`` (1 marks the pixels to fill, the toolkit's and LaMa's convention) or ``hole_is_0``.
        multiple: pad the sides (bottom and right, mirrored) to a multiple of this before the call and crop the
            answer back (IOPaint pads LaMa to 8); 1 pads nothing.
    """

    range: tuple[float, float] = (0.0, 1.0)
    channels: str = "rgb"
    mask: str = "hole_is_1"
    multiple: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "range", _parse_range(self.range))
        if self.channels not in CHANNELS:
            raise ValueError(f"channels {self.channels!r} is not one of {list(CHANNELS)}")
        if self.mask not in MASKS:
            raise ValueError(f"mask {self.mask!r} is not one of {list(MASKS)} (which value marks the pixels to fill)")
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, int) or self.multiple < 1:
            raise ValueError(f"multiple must be an int >= 1 (1: no padding), got {self.multiple!r}")

    @classmethod
    def parse(cls, value: "BlackBoxConvention | Mapping[str, Any] | None" = None, **kwargs: Any) -> "BlackBoxConvention":
        """A convention from an instance, a mapping of its fields (unknown keys refused) and/or keyword arguments."""
        if isinstance(value, BlackBoxConvention):
            if kwargs:
                raise ValueError("give the black box's convention either as a BlackBoxConvention or as keywords, not both")
            return value
        fields = {**dict(value or {}), **kwargs}
        valid = ("range", "channels", "mask", "multiple")
        unknown = [k for k in fields if k not in valid]
        if unknown:
            raise ValueError(f"unknown black-box convention key(s) {unknown}; valid keys: {list(valid)}")
        return cls(**fields)

    @property
    def range_name(self) -> str:
        return _range_name(self.range)

    def to_box(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The toolkit's image (``[-1, 1]``, RGB) and mask (1 = hole) in this convention."""
        lo, hi = self.range
        image = lo + (image + 1) * (0.5 * (hi - lo))
        if self.channels == "bgr":
            image = image.flip(1)
        if self.mask == "hole_is_0":
            mask = 1 - mask
        return image, mask

    def from_box(self, image: torch.Tensor) -> torch.Tensor:
        """An image of this convention in the toolkit's (``[-1, 1]``, RGB)."""
        lo, hi = self.range
        if self.channels == "bgr":
            image = image.flip(1)
        return (image - lo) * (2.0 / (hi - lo)) - 1


class _OnnxFunction:
    """An ONNX inpainting graph as ``(image, mask) -> image`` on torch tensors (run by onnxruntime)."""

    def __init__(self, path: Path, providers: Sequence[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError(f"{path} is an ONNX file: running it needs onnxruntime (pip install onnxruntime)") from None
        try:
            self.session = ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ValueError(f"onnxruntime cannot load {path}: {type(e).__name__}: {e}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 2:
            raise ValueError(
                f"the ONNX teacher {path.name} takes {len(inputs)} input(s) {[i.name for i in inputs]}; a black box is "
                "called with two, (image, mask): export the network with the image and the mask as separate inputs"
            )
        names = [i.name.lower() for i in inputs]
        order = [0, 1]
        if "mask" in names[0] and "mask" not in names[1]:  # named the other way round
            order = [1, 0]
        self.inputs = [inputs[i] for i in order]
        self.output = self.session.get_outputs()[0].name
        self.path = path

    @staticmethod
    def _numpy(x: torch.Tensor, onnx_type: str) -> np.ndarray:
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                  "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}
        dtype = dtypes.get(onnx_type)
        if dtype is None:
            raise TypeError(f"an ONNX teacher input of type {onnx_type} is not supported; inputs are float, int or bool tensors")
        x = x.detach().float().cpu()
        if np.issubdtype(dtype, np.integer) or dtype is np.bool_:
            x = x.round()
        return x.numpy().astype(dtype)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        feed = {i.name: self._numpy(x, i.type) for i, x in zip(self.inputs, (image, mask))}
        (out,) = self.session.run([self.output], feed)
        return torch.from_numpy(np.asarray(out)).to(image.device)

    def __repr__(self) -> str:
        return f"ONNX({self.path.name})"


class BlackBoxTeacher(nn.Module):
    """A function ``(image, mask) -> image`` as a teacher of the toolkit's conventions; see the module docstring.

    ``forward(image, mask)``: ``image`` ``(B, 3, H, W)`` float in ``[-1, 1]`` RGB, ``mask`` ``(B, 1, H, W)`` in
    {0, 1}, 1 = hole. Returns the function's answer ``(B, 3, H, W)`` float32 in ``[-1, 1]`` RGB, computed without
    gradient. No parameters: the function is not part of the module tree, so no optimiser, ``state_dict`` or
    ``prepare`` ever sees it.
    """

    blackbox = True  # no hooks can reach inside (kdinpaint.attach reads it)

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], Any], convention: BlackBoxConvention, name: str = "") -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"a black-box teacher must be callable as fn(image, mask), got {type(fn).__name__}")
        object.__setattr__(self, "fn", fn)  # outside the module tree on purpose
        self.convention = convention
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.calls = 0
        self._device: torch.device | None = None

    def _place(self, device: torch.device) -> None:
        """Move a module function (TorchScript, nn.Module) to the input's device once per device."""
        if self._device != device and isinstance(self.fn, nn.Module):
            self.fn.to(device)
            self.fn.eval()
        self._device = device

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3 or not image.is_floating_point():
            got = f"{tuple(image.shape)} {image.dtype}" if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"black-box teacher {self.name}: the image must be a float (B, 3, H, W) tensor in [-1, 1], got {got}")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != image.shape[-2:]:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"black-box teacher {self.name}: the mask must be (B, 1, H, W) of the image's size "
                             f"{tuple(image.shape[-2:])}, got {got}")
        size = image.shape[-2:]
        self._place(image.device)
        x, m = self.convention.to_box(image.float(), mask.to(torch.float32).expand(image.shape[0], 1, *size))
        if self.convention.multiple > 1:
            x = pad_bottom_right(x, self.convention.multiple)
            m = pad_bottom_right(m, self.convention.multiple)
        with torch.no_grad():
            out = self.fn(x, m)
        if isinstance(out, np.ndarray):
            out = torch.from_numpy(out).to(image.device)
        self._check_shape(out, x, m)
        out = crop_top_left(out, size)
        if self.calls == 0:
            self._check_values(out, crop_top_left(x, size))
        self.calls += 1
        return self.convention.from_box(out.float())

    def _check_shape(self, out: Any, x: torch.Tensor, m: torch.Tensor) -> None:
        if isinstance(out, torch.Tensor) and out.shape == x.shape:
            return
        if not isinstance(out, torch.Tensor):
            kind = type(out).__name__
            raise TypeError(
                f"black-box teacher {self.name} returned a {kind}, not an image tensor; it must return the inpainted image "
                f"{tuple(x.shape)} (wrap a function that returns several outputs so that it returns the image)"
            )
        hint = ""
        if out.dim() == 4 and tuple(out.shape[1:]) == (x.shape[2], x.shape[3], 3):
            hint = "; it looks channels-last (B, H, W, 3): permute it to (B, 3, H, W) in the function"
        elif out.dim() == 3 and out.shape == x.shape[1:]:
            hint = "; the batch axis is missing"
        elif out.dim() == 4 and out.shape[-2:] != x.shape[-2:]:
            hint = ("; its size differs from the input's: a network that needs sides of a multiple of k gets "
                    "multiple=k in its convention")
        raise ValueError(
            f"black-box teacher {self.name} returned shape {tuple(out.shape)} for an image {tuple(x.shape)} and a mask "
            f"{tuple(m.shape)}; it must return the inpainted image {tuple(x.shape)} (B, 3, H, W){hint}"
        )

    def _check_values(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """At the first call: finite, inside the declared range, and not a network of another range (a ``[0, 1]`` network
        declared ``[0, 255]`` is refused, declared ``[-1, 1]`` warned about)."""
        conv = self.convention
        lo, hi = conv.range
        declared = conv.range_name
        values = out.detach().float()
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"black-box teacher {self.name} returned NaN or infinite values at its first call")
        omin, omax = float(values.min()), float(values.max())
        imin, imax = float(x.min()), float(x.max())
        slack = RANGE_SLACK * (hi - lo)
        seen = f"values in [{omin:.4g}, {omax:.4g}] for an input in [{imin:.4g}, {imax:.4g}]"
        fits = [name for name, (a, b) in RANGES.items() if omin >= a - RANGE_SLACK * (b - a) and omax <= b + RANGE_SLACK * (b - a)]
        if omin < lo - slack or omax > hi + slack:
            hint = f"; its values fit {fits[0]}: declare range {fits[0]}" if fits else ""
            raise ValueError(
                f"black-box teacher {self.name} returned {seen}, outside its declared range {declared}{hint} "
                f"(range: {' | '.join(RANGES)})"
            )
        dark = float((x < lo + 0.375 * (hi - lo)).float().mean())  # the input's share below toolkit value -0.25
        if declared == "[0, 255]" and imax > 2 and omax <= 1 + RANGE_SLACK:
            raise ValueError(
                f"black-box teacher {self.name} returned {seen}, declared range [0, 255]: it answers like a [0, 1] "
                "network; declare range [0, 1]"
            )
        spread = omax - omin > 0.25 * (hi - lo)  # an image's worth of values, not an untrained network's near-constant
        if declared == "[-1, 1]" and dark > 0.1 and imin < -0.5 and omin >= -slack and spread:  # a warning: a poorly
            # trained network may answer so too
            warnings.warn(
                f"black-box teacher {self.name} returned {seen}, declared range [-1, 1], with {dark:.0%} of the input "
                "below -0.25 and no output below 0: it answers like a [0, 1] network; if it is one, declare range [0, 1]",
                UserWarning, stacklevel=3,
            )

    def extra_repr(self) -> str:
        c = self.convention
        return f"{self.name}, range={c.range_name}, channels={c.channels}, mask={c.mask}, multiple={c.multiple}"


def is_blackbox(module: Any) -> bool:
    """Whether ``module`` is a black-box teacher (no hooks can reach inside it)."""
    return getattr(module, "blackbox", False) is True


def _load_file(path: Path, providers: Sequence[str] | None) -> tuple[Callable, str]:
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder; a black-box teacher is one TorchScript (.pt) or ONNX (.onnx) file. A LaMa model folder "
            "(config.yaml + models/best.ckpt) is read by the lama adapter as a white box: teacher.adapter: lama with "
            "teacher.kwargs.pretrained: PATH"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no black-box teacher file at {path}")
    if path.suffix.lower() == ".onnx":
        return _OnnxFunction(path, providers), path.name
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`torch\.jit\.", FutureWarning)  # IOPaint's format is TorchScript
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{path} is not a TorchScript file ({first}); a black-box teacher is a TorchScript file (torch.jit.save, as "
            "IOPaint's big-lama.pt) or an ONNX file (.onnx). A LaMa best.ckpt is a white box: the lama adapter reads it "
            "(teacher.adapter: lama, teacher.kwargs.pretrained: PATH)"
        ) from None
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module, path.name


def load_blackbox(
    source: str | os.PathLike[str] | Callable[[torch.Tensor, torch.Tensor], Any],
    convention: BlackBoxConvention | Mapping[str, Any] | None = None,
    *,
    providers: Sequence[str] | None = None,
    **convention_kwargs: Any,
) -> BlackBoxTeacher:
    """A black-box teacher from a TorchScript file, an ONNX file or a callable ``fn(image, mask) -> image``.

    Args:
        source: a path (``.onnx``: onnxruntime; anything else: ``torch.jit.load``), a ``torch.jit`` module, an
            ``nn.Module`` or any callable taking ``(image, mask)`` tensors of the declared convention and returning
            the inpainted image ``(B, 3, H, W)`` (a tensor or a NumPy array).
        convention: a :class:`BlackBoxConvention` or a mapping of its fields; or give them as keywords
            (``range=[0, 1], channels="rgb", mask="hole_is_1", multiple=8``). Default: IOPaint's LaMa call
            without padding (``[0, 1]``, RGB, 1 = hole).
        providers: onnxruntime execution providers (default ``["CPUExecutionProvider"]``).

    Returns a :class:`BlackBoxTeacher`, called with the toolkit's conventions.
    """
    conv = BlackBoxConvention.parse(convention, **convention_kwargs)
    if isinstance(source, (str, os.PathLike)):
        fn, name = _load_file(Path(source), providers)
    elif callable(source):
        fn, name = source, getattr(source, "original_name", None) or getattr(source, "__name__", type(source).__name__)
        if isinstance(fn, nn.Module):
            fn.eval()
    else:
        raise TypeError(f"a black-box teacher is a file path or a callable fn(image, mask), got {type(source).__name__}")
    teacher = BlackBoxTeacher(fn, conv, name)
    log.info("black-box teacher %s (%s)", name, teacher.extra_repr())
    return teacher
