"""LaMa and its students as files other programs run: ONNX (FFT included) and IOPaint's TorchScript.

ONNX. torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, what :func:`kdinpaint.deploy.export_onnx`
uses) translates ``torch.fft.rfft2`` / ``irfft2`` into ONNX's ``DFT`` operator (opset 17+), which onnxruntime
runs: the FFT does not block this exporter (it blocks the legacy TorchScript-based one). For runtimes without
``DFT``, ``dft="matmul"`` exports the same transform as matrix products (:mod:`.spectral`): the graph then holds
only ``MatMul``, ``Conv`` and elementwise operators. :func:`export_onnx` takes a :class:`~.model.LaMa` or any
exported student (:class:`~kdinpaint.export.CompletedModel`) and checks the file against eager PyTorch.

IOPaint. IOPaint (``iopaint/model/lama.py``) runs big-lama as a TorchScript file, traced by LaMa's
``bin/to_jit.py`` from its training module, and calls it as::

    model = torch.jit.load(path, map_location="cpu").to(device).eval()
    out = model(image, mask)   # image (1, 3, H, W) float32 RGB in [0, 1]; mask (1, 1, H, W) int64 in {0, 1}
                               # ((mask > 0) * 1 of a [0, 1] float mask); H, W padded to multiples of 8
    # out: (1, 3, H, W) in [0, 1], the composite mask * prediction + (1 - mask) * image; IOPaint clips
    # out * 255 to uint8 and crops the padding away

:func:`export_iopaint` writes a file with that call (:class:`IOPaintCall`: binarise the mask, map the image to
``[-1, 1]``, blank the holes, predict, composite in ``[0, 1]``), for a LaMa or any exported student, so it can
take big-lama.pt's place in IOPaint's model folder. The file is traced at one size and checked at others: LaMa
itself runs at any multiple of 8 (its FFT sizes are traced from the input). A student with completion blocks or
PGL is refused: their adaptive convolutions read the image size as Python numbers (:mod:`kdinpaint.deploy`),
so a traced graph would serve one size only, while IOPaint calls the file at every size; such students export
per size as ONNX or ``.pt2`` (``kdinpaint export``).

Where IOPaint looks: ``$TORCH_HOME/hub/checkpoints/big-lama.pt`` (``~/.cache/torch/hub/checkpoints``; its md5 is
checked only after a download, so a file put there is used as it is), or any path given in the environment
variable ``LAMA_MODEL_URL`` (an existing path is loaded directly).

Command line: ``python -m kdinpaint_adapters.lama.export OUT.pt|OUT.onnx --pretrained best.ckpt`` (a released
LaMa) or ``--checkpoint student.safetensors`` (a file of :func:`kdinpaint.save_exported`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from kdinpaint import deploy
from kdinpaint.export import CompletedModel
from kdinpaint.spec import AdapterSpec

from .ffc import set_dft
from .model import LaMa

__all__ = ["as_completed", "IOPaintCall", "export_onnx", "export_iopaint", "load_iopaint", "iopaint_inputs", "main"]

_logger = logging.getLogger(__name__)


def as_completed(model: nn.Module) -> CompletedModel:
    """``model`` as an exported model: a :class:`~kdinpaint.export.CompletedModel` is returned as it is; a
    :class:`LaMa` is wrapped without completion blocks (LaMa as released), in eval mode."""
    if isinstance(model, CompletedModel):
        return model.eval()
    if isinstance(model, LaMa):
        from . import ADAPTER_SPEC

        return CompletedModel(model, AdapterSpec.from_dict(ADAPTER_SPEC), nn.ModuleDict(), []).eval()
    raise TypeError(f"expected a LaMa or an exported student (Distiller.export(), load_checkpoint), got {type(model).__name__}")


def _stride(model: CompletedModel) -> int:
    return int(getattr(model.model, "stride", 8))


def export_onnx(model: nn.Module, path: str | os.PathLike[str], height: int, width: int, *, dft: str = "fft",
                batch: int = 1, check: bool = True) -> float | None:
    """Write ``model`` (a :class:`LaMa` or an exported student) as ONNX for ``batch x 3 x height x width``
    (:func:`kdinpaint.deploy.export_onnx`: inputs ``image`` in ``[-1, 1]`` and ``mask``, output ``prediction``).

    ``dft``: ``"fft"`` (ONNX ``DFT``) or ``"matmul"`` (no ``DFT`` operator), for every Fourier unit of the model;
    the model is changed back afterwards. ``check``: run the file with onnxruntime on a random image with a
    centre hole and return ``max |onnx - eager|`` (``None`` without the check).
    """
    completed = as_completed(model)
    previous = {m: m.dft for m in completed.modules() if hasattr(m, "dft") and isinstance(m.dft, str)}
    set_dft(completed, dft)
    try:
        deploy.export_onnx(completed, path, height, width, _stride(completed), batch=batch)
        if not check:
            return None
        image, mask = deploy.example_inputs(height, width, batch, seed=1)
        with torch.inference_mode():
            eager = deploy.Deployable(completed)(image, mask)
        return float((deploy.run_onnx(path, image, mask) - eager).abs().max())
    finally:
        for m, mode in previous.items():
            m.dft = mode


class IOPaintCall(nn.Module):
    """IOPaint's call of big-lama around a model of the toolkit: ``(image, mask) -> inpainted``.

    ``image``: ``(B, 3, H, W)`` float RGB in ``[0, 1]``; ``mask``: ``(B, 1, H, W)`` of any dtype, hole where
    ``> 0`` (IOPaint passes int64 0/1). Returns ``mask * prediction + (1 - mask) * image`` in ``[0, 1]``, as
    LaMa's ``inpainted``. ``H`` and ``W``: multiples of the model's stride (IOPaint pads to 8).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.deployable = deploy.Deployable(as_completed(model))

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = (mask > 0).to(image.dtype)
        prediction = self.deployable(image * 2 - 1, mask)  # toolkit conventions: [-1, 1], holes blanked inside
        prediction = ((prediction + 1) * 0.5).clamp(0, 1)
        return mask * prediction + (1 - mask) * image


def iopaint_inputs(height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An image and a mask as IOPaint builds them: ``(1, 3, H, W)`` float32 in ``[0, 1]`` (``uint8 / 255``) and
    ``(1, 1, H, W)`` int64 ``(mask > 0) * 1`` with a hole of about a quarter of the image."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (1, 3, height, width), generator=g).float() / 255
    mask = torch.zeros(1, 1, height, width, dtype=torch.int64)
    mask[..., height // 4 : 3 * height // 4, width // 3 : 2 * width // 3 + 1] = 1
    return image, mask


def load_iopaint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load a TorchScript file the way IOPaint does (``torch.jit.load(path, map_location="cpu").to(device).eval()``)."""
    return torch.jit.load(str(path), map_location="cpu").to(device).eval()


def export_iopaint(
    model: nn.Module,
    path: str | os.PathLike[str],
    height: int = 512,
    width: int = 512,
    *,
    check_sizes: Sequence[tuple[int, int]] = ((256, 384), (128, 128)),
) -> dict[str, float]:
    """Write ``model`` as a TorchScript file with IOPaint's big-lama call (:class:`IOPaintCall`).

    Traced at ``1 x 3 x height x width`` (multiples of the model's stride) and reloaded with
    :func:`load_iopaint`; the traced size and every size of ``check_sizes`` are compared with eager PyTorch on
    IOPaint-style inputs, and a difference above 1e-4 raises ``ValueError`` (nothing is written). Returns
    ``{"HxW": max |file - eager|}``. A student with completion blocks or PGL is refused (module docstring).
    Written atomically.
    """
    completed = as_completed(model)
    if completed.sites or completed.fusion_sites:
        raise ValueError(
            f"this student has completion blocks / PGL at {[*completed.sites, *completed.fusion_sites]}: their adaptive "
            "convolutions read the image size as Python numbers, so a TorchScript trace would serve one size only, and "
            "IOPaint calls its model at every size (padded to multiples of 8); export it per size with kdinpaint export "
            "(ONNX or .pt2), or export a student without them"
        )
    stride = _stride(completed)
    for h, w in [(height, width), *check_sizes]:
        if h % stride or w % stride or min(h, w) < 2 * stride:
            raise ValueError(f"size {h}x{w} is not a multiple of the model's stride {stride} (>= {2 * stride}); "
                             f"IOPaint pads images to multiples of 8")
    wrapper = IOPaintCall(completed).eval()
    example = iopaint_inputs(height, width)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        # shape arithmetic in Python becomes constants of the trace: the size checks below catch any that matter
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", r"`torch\.jit\.", FutureWarning)  # IOPaint's format is TorchScript
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        traced.save(str(tmp))
        loaded = load_iopaint(tmp)
    diffs: dict[str, float] = {}
    for i, (h, w) in enumerate([(height, width), *check_sizes]):
        image, mask = iopaint_inputs(h, w, seed=i + 1)
        with torch.no_grad():
            got, want = loaded(image, mask), wrapper(image, mask)
        diffs[f"{h}x{w}"] = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    bad = {k: v for k, v in diffs.items() if not v <= 1e-4}
    if bad:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"the TorchScript file differs from eager PyTorch at {bad} (max abs difference per size); "
                         "report it with the model that was exported")
    os.replace(tmp, path)
    return diffs


# ---- command line -----------------------------------------------------------------------------------------
def _model(args: argparse.Namespace) -> nn.Module:
    if args.checkpoint:
        from kdinpaint.export import load_checkpoint

        return load_checkpoint(args.checkpoint)[0]
    from .official import load_official

    if args.pretrained:
        return load_official(args.pretrained).eval()
    print(f"WARNING: no --pretrained / --checkpoint: exporting LaMa {args.config} with RANDOM weights", file=sys.stderr)
    return LaMa(args.config).eval()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdinpaint_adapters.lama.export",
                                description="LaMa or a student as IOPaint's TorchScript (OUT.pt) or as ONNX (OUT.onnx)")
    p.add_argument("output", help="OUT.pt (TorchScript with IOPaint's big-lama call) or OUT.onnx")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pretrained", help="a LaMa best.ckpt (config inferred from its weights)")
    g.add_argument("--checkpoint", help="a student written by kdinpaint.save_exported(..., adapter='name:variant')")
    p.add_argument("--config", default="big-lama", help="without a file: LaMa config with random weights")
    p.add_argument("--size", type=int, nargs="+", default=[512], metavar="SIDE", help="H [W] to trace at")
    p.add_argument("--dft", choices=("fft", "matmul"), default="fft", help="ONNX: the DFT operator or matrix products")
    args = p.parse_args(argv)
    H, W = args.size[0], args.size[-1]
    model = _model(args)
    out = Path(args.output)
    if out.suffix == ".onnx":
        diff = export_onnx(model, out, H, W, dft=args.dft)
        print(f"wrote {out} (ONNX, 1x3x{H}x{W}, dft={args.dft}); max |onnxruntime - eager| = {diff:.2e}")
    elif out.suffix == ".pt":
        diffs = export_iopaint(model, out, H, W)
        print(f"wrote {out} (TorchScript, IOPaint's call, traced at {H}x{W}); max |file - eager| per size: "
              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    else:
        p.error(f"name the output .pt (TorchScript for IOPaint) or .onnx, got {out.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
