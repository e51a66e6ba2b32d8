"""The exported student (:class:`~kdinpaint.export.CompletedModel`) as a graph: ``torch.compile``,
``torch.export`` (a ``.pt2`` file that reloads without kdinpaint's classes) and ONNX (``kdinpaint[onnx]``).

:class:`Deployable` is the traced function: ``(image, mask) -> prediction``, image ``(B, 3, H, W)`` in [-1, 1]
and mask ``(B, 1, H, W)`` in {0, 1} (1 = hole), ``H`` and ``W`` multiples of the adapter's stride. It blanks
the holes itself (the graph never sees the pixels under them) and returns the raw prediction (the spec's
``output``); padding to the stride and compositing stay with the caller, as
:class:`~kdinpaint.inference.Inpainter` does them. The input checks of ``CompletedModel`` (mask values, image
range) read the data and cannot be traced: :meth:`~kdinpaint.inference.Inpainter` runs them before calling.

Sizes. A graph is specialised to the ``H × W`` it was traced at (the batch size too, for ``torch.export``):
the adaptive convolutions of the completion blocks and PGL normalise their sampling grid by the next power of
two of each side, which a traced shape cannot express. Export once per deployed size (``kdinpaint export
--size``); within it the pixel attention keeps its blocks of query rows (unrolled), so memory stays
``O(rows × N)`` as in eager mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdinpaint.calling import convention, select_output
from kdinpaint.export import CompletedModel
from kdinpaint.masking import masked
from kdinpaint.ops.attention import blocked_export

__all__ = ["Deployable", "example_inputs", "compile_model", "export_program", "save_program", "load_program", "export_onnx", "fold_onnx", "run_onnx"]


class Deployable(nn.Module):
    """``(image, mask) -> prediction`` of a :class:`CompletedModel`, traceable (no data-dependent checks)."""

    def __init__(self, model: CompletedModel):
        super().__init__()
        if not isinstance(model, CompletedModel):
            raise TypeError(f"Deployable takes the exported model (Distiller.export(), load_checkpoint), got {type(model).__name__}")
        blocker = getattr(model.model, "untraceable_reason", None)  # a network may say it cannot be traced
        if blocker:
            raise ValueError(f"this model cannot be compiled or exported as a graph: {blocker}")
        self.completed = model.eval()
        self._call = convention(model.model, model.spec)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        model = self.completed
        model._context.mask = mask  # the completion sites read it
        try:
            args, kwargs = self._call.build(masked(image, mask), mask)
            return select_output(model.model(*args, **kwargs), model.spec.output)
        finally:
            model._context.mask = None


def example_inputs(height: int, width: int, batch: int = 1, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random image in [-1, 1] and a centre hole of a quarter of the image, for tracing and parity checks."""
    g = torch.Generator().manual_seed(seed)
    image = (torch.rand(batch, 3, height, width, generator=g) * 2 - 1).to(device, dtype)
    mask = torch.zeros(batch, 1, height, width, device=device, dtype=dtype)
    mask[..., height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1
    return image, mask


def _check_size(height: int, width: int, stride: int) -> None:
    if height % stride or width % stride or height < stride or width < stride:
        raise ValueError(f"export size {height}x{width} is not a positive multiple of the network's stride {stride}; "
                         f"use {max(stride, height // stride * stride)}x{max(stride, width // stride * stride)}")


def compile_model(model: CompletedModel, **compile_kwargs: Any) -> Any:
    """``torch.compile`` of :class:`Deployable` ``(image, mask) -> prediction``."""
    return torch.compile(Deployable(model), **compile_kwargs)


def export_program(model: CompletedModel, height: int, width: int, stride: int, batch: int = 1) -> torch.export.ExportedProgram:
    """``torch.export`` of :class:`Deployable` at ``batch × 3 × height × width`` (multiples of ``stride``)."""
    _check_size(height, width, stride)
    module = Deployable(model)
    p = next(iter(model.parameters()), None)
    args = example_inputs(height, width, batch, device=p.device if p is not None else "cpu",
                          dtype=p.dtype if p is not None else torch.float32)
    with torch.no_grad():
        return torch.export.export(module, args)


def save_program(program: torch.export.ExportedProgram, path: str | Path) -> None:
    """Write a ``.pt2`` file (atomic); :func:`load_program` or plain ``torch.export.load(path).module()`` reads it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.export.save(program, str(tmp))
    tmp.replace(path)


def load_program(path: str | Path) -> nn.Module:
    """The callable ``(image, mask) -> prediction`` of a ``.pt2`` file written by :func:`save_program`.

    A ``.pt2`` is a program: load it from trusted sources only. What torch would unpickle with code is refused
    first (:func:`check_program_archive`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported program {str(path)!r} does not exist")
    check_program_archive(path)
    try:
        return torch.export.load(str(path)).module()
    except (RuntimeError, KeyError, ValueError) as e:  # a zip of another kind (torch.save's .pt), truncated, another torch
        raise ValueError(f"{str(path)!r} cannot be read as a torch.export program ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); write it with kdinpaint export (or torch.export.save)") from None


def check_program_archive(path: str | Path) -> None:
    """Refuse a ``.pt2`` archive from which ``torch.export.load`` would unpickle objects that can run code: weights
    or constants marked ``use_pickle``, custom or opaque objects, and pickled files (sample inputs, legacy constants)
    that do not load with ``weights_only=True`` (torch retries those with ``weights_only=False``). Files written by
    :func:`save_program` hold none of these. A ``ValueError`` names the entry."""
    import io
    import json
    import zipfile

    def refuse(entry: str, why: str) -> None:
        raise ValueError(
            f"{str(path)!r} is refused: its entry {entry!r} {why}, which torch.export.load would unpickle with code "
            "(a crafted file could run it); kdinpaint export never writes such entries: export the model again"
        )

    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{str(path)!r} is not a .pt2 archive (not a zip file); write it with kdinpaint export") from None
    with archive:
        for name in archive.namelist():
            inner = name.split("/", 1)[1] if "/" in name else name  # below the archive's root folder
            if inner.startswith("data/constants/") and inner[len("data/constants/"):].startswith(("custom_obj_", "opaque_obj_")):
                refuse(name, "is a custom object")
            elif inner.endswith(("_weights_config.json", "_constants_config.json")):
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                except (ValueError, AttributeError):
                    refuse(name, "is not a readable payload configuration")
                pickled = [k for k, v in config.items() if isinstance(v, dict) and v.get("use_pickle")]
                if pickled:
                    refuse(name, f"marks {pickled[:3]} as pickled")
            elif inner.endswith(".pt"):  # sample inputs, legacy constants: torch.save pickles
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception:  # noqa: BLE001 - anything weights_only refuses is refused here
                    refuse(name, "is a pickle that does not load as tensors only")


def export_onnx(model: CompletedModel, path: str | Path, height: int, width: int, stride: int, *, batch: int = 1,
                opset: int = 18) -> Path:
    """Write an ONNX file of :class:`Deployable` (inputs ``image``, ``mask``; output ``prediction``) for
    ``batch × 3 × height × width`` images: :func:`export_program` converted by torch's ONNX exporter
    (``torch.onnx.export(..., dynamo=True)``, which needs ``onnxscript``; all in the ``onnx`` extra)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs the onnx extra (onnx, onnxscript, onnxruntime): pip install 'kdinpaint[onnx]'") from None
    path = Path(path)
    with blocked_export():  # attention block by block: onnxruntime would store the fused node's N×N product
        program = export_program(model.float().cpu(), height, width, stride, batch)
    tmp = path.with_name(path.name + ".tmp")
    onnx_program = torch.onnx.export(program, f=None, input_names=["image", "mask"], output_names=["prediction"],
                                     opset_version=opset, dynamo=True, external_data=False, optimize=False)
    fold_onnx(onnx_program.model)
    onnx_program.save(str(tmp))
    tmp.replace(path)
    return path


def fold_onnx(model: Any) -> None:
    """Simplify an ONNX graph (``onnx_ir.Model``) in place: constants folded (the traced shapes and index
    arithmetic), then lifted, deduplicated, common subexpressions merged and unused nodes removed; onnxscript's
    pattern rewrites, the rest of what ``torch.onnx.export(optimize=True)`` runs, are left out. On the main job's
    network at 64×64 (22,375 nodes unfolded) this took 27 s against 434 s for the full optimisation, and gave
    4,198 nodes against 4,155 with the same output and onnxruntime time (242 against 245 ms)."""
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants_ir

    for _ in range(2):
        folded = fold_constants_ir(model, onnx_shape_inference=True)
        common.RemoveUnusedNodesPass()(model)
        if not folded.modified:
            break
    for step in (common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                 common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
                 common.RemoveUnusedNodesPass()):
        step(model)


def run_onnx(path: str | Path, image: torch.Tensor, mask: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """Run an ONNX file of :func:`export_onnx` with onnxruntime on the CPU."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("running ONNX needs the onnx extra: pip install 'kdinpaint[onnx]'") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = session.run(["prediction"], {"image": image.detach().cpu().float().numpy(), "mask": mask.detach().cpu().float().numpy()})
    return torch.from_numpy(out[0])

