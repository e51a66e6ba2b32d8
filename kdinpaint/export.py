"""The deployable network: the student with its completion blocks and PGL built in, nothing training-only.

:meth:`Distiller.export` returns a :class:`CompletedModel`: a deep copy of the student in which every
completion site is wrapped by a :class:`CompletedSite` (``inner`` = the original module, ``block`` = its
completion block; a site ``path[N]`` completes element N of the module's tuple output) and every fusion site by a
:class:`FusedSite` (``inner`` = the attention module). It needs no hook and no Distiller; the forward binds the mask from the call (the spec's
``mask_arg``) and the sites read it. In eval it is bit-identical to the attached student.

Saving and loading go through safetensors; the file's metadata carries the spec and the block widths, so
``load_exported(path, fresh_student)`` rebuilds it from a fresh instance of the student's class.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import reprlib
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from kdinpaint import _modules
from kdinpaint._files import usual_permissions
from kdinpaint.blocks import CompletionBlock, GlobalLocalFusion, build_completion_blocks, build_fusions
from kdinpaint.calling import convention
from kdinpaint.masking import check_image_range, check_mask
from kdinpaint.adapter import Adapter
from kdinpaint.plugins import adapter_from_target, get_adapter
from kdinpaint.spec import AdapterSpec, SpecLike, load_spec
from kdinpaint.weights import check_file_values, load_weights

__all__ = ["CompletedModel", "CompletedSite", "FusedSite", "save_exported", "load_exported", "load_checkpoint",
           "is_exported", "load_network", "as_completed"]


class _MaskContext:
    """The mask of the call in progress, shared by the sites of one CompletedModel."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None


class _Wrapper(nn.Module):
    """A module wrapping ``self.inner``: attribute lookups it does not answer fall through to ``inner``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


class CompletedSite(_Wrapper):
    """``inner`` followed by its completion block (Eq. 5). Attribute lookups fall through to ``inner``."""

    def __init__(self, inner: nn.Module, block: CompletionBlock, context: _MaskContext, index: int | None = None):
        super().__init__()
        self.inner = inner
        self.block = block
        self._context = context
        self.index = index  # the completed element of a tuple output (None: the output itself)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        mask = self._context.mask
        if mask is None:
            raise RuntimeError("a completion site ran outside a call of its CompletedModel; call the whole model with (image, mask)")
        return _modules.replace_element(out, self.index, self.block(_modules.element(out, self.index), mask))


class FusedSite(_Wrapper):
    """An attention module ``inner`` with global-local fusion (Eq. 10) around it: ``fusion(D, inner(D))``."""

    def __init__(self, inner: nn.Module, fusion: GlobalLocalFusion, index: int | None = None):
        super().__init__()
        self.inner = inner
        self.fusion = fusion
        self.index = index  # the fused element of a tuple output (None: the output itself)

    def forward(self, d: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(d, *args, **kwargs)
        return _modules.replace_element(out, self.index, self.fusion(d, _modules.element(out, self.index)))


class CompletedModel(nn.Module):
    """Student + completion blocks + global-local fusion; called exactly like the student."""

    def __init__(
        self,
        model: nn.Module,
        spec: AdapterSpec,
        blocks: nn.ModuleDict,
        sites: list[str],
        fusions: nn.ModuleDict | None = None,
        fusion_sites: list[str] = (),
    ):
        super().__init__()
        fusions = fusions if fusions is not None else nn.ModuleDict()
        if len(blocks) != len(sites) or len(fusions) != len(fusion_sites):
            raise ValueError(f"{len(sites)} completion sites for {len(blocks)} blocks, {len(fusion_sites)} fusion sites for {len(fusions)} fusions")
        self.spec = spec
        self.sites = list(sites)
        self.fusion_sites = list(fusion_sites)
        self.site_channels = [blocks[str(i)].conv.channels for i in range(len(sites))]
        self.fusion_channels = [fusions[str(i)].channels for i in range(len(fusion_sites))]
        self._context = _MaskContext()
        self._call = convention(model, spec)
        split = _modules.split_index
        wraps = [(*split(p), lambda inner, x, i=i: CompletedSite(inner, blocks[str(i)], self._context, x))
                 for i, p in enumerate(sites)]
        wraps += [(*split(p), lambda inner, x, i=i: FusedSite(inner, fusions[str(i)], x)) for i, p in enumerate(fusion_sites)]
        # wrap deeper paths first so a site inside another site keeps its path (two elements of one module: nested)
        for path, index, wrap in sorted(wraps, key=lambda t: -t[0].count(".")):
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, name, wrap(getattr(parent, name), index))
        self.model = model

    @classmethod
    def from_distiller(cls, kd: "Any") -> "CompletedModel":
        model = kd.student_copy()  # without the Distiller's hooks
        fusion_sites = [site.module for site in kd.attention if site.fusion]
        return cls(model, kd.spec, copy.deepcopy(kd.blocks), kd.sites, copy.deepcopy(kd.fusion), fusion_sites)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        image = self._call.get(args, kwargs, "image")
        check_image_range(image, tol=0.01)  # a [0, 1] or [0, 255] image, or NaN, would pass through unnoticed
        self._context.mask = check_mask(self._call.get(args, kwargs, "mask"), image)
        try:
            return self.model(*args, **kwargs)
        finally:
            self._context.mask = None


def save_exported(
    model: CompletedModel, path: str | Path, *, adapter: str | None = None, builder_kwargs: dict | None = None,
    target: str | None = None, stride: int = 1,
) -> None:
    """Write weights as safetensors, with the spec and block widths in the metadata (atomic).

    ``adapter`` (``"name:variant"``) or ``target`` (``"package.module:Class"``, with ``stride``) and
    ``builder_kwargs`` record how to build a fresh student, so that :func:`load_checkpoint` can rebuild the model
    from the file alone.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    meta = {
        "kdinpaint.spec": model.spec.to_yaml(),
        "kdinpaint.sites": json.dumps(model.sites),
        "kdinpaint.site_channels": json.dumps(model.site_channels),
        "kdinpaint.fusion_sites": json.dumps(model.fusion_sites),
        "kdinpaint.fusion_channels": json.dumps(model.fusion_channels),
    }
    if adapter is not None:
        meta["kdinpaint.adapter"] = adapter
    if target is not None:  # a network named by import path (recipe model.target): the file alone rebuilds it
        meta["kdinpaint.target"] = target
        meta["kdinpaint.stride"] = str(int(stride))
    if adapter is not None or target is not None:
        meta["kdinpaint.builder_kwargs"] = json.dumps(builder_kwargs or {})
    save_model(model, str(tmp), metadata=meta)
    usual_permissions(tmp)  # safetensors writes 0600
    tmp.replace(path)


def _metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"exported model {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - SafetensorError (empty, truncated, not safetensors), OSError
        raise ValueError(
            f"{path} cannot be read as a safetensors file ({type(e).__name__}: {e}); it is empty, truncated or not "
            "a model exported by kdinpaint: export it again (kdinpaint.save_exported)"
        ) from None
    if "kdinpaint.spec" not in meta:
        raise ValueError(f"{path} was not written by kdinpaint.save_exported (no kdinpaint.spec in its metadata)")
    return meta


def _meta_json(meta: dict[str, str], key: str, path: Path, default: str, kind: type, items: type | None = None) -> Any:
    """The JSON value of metadata ``key`` (``default`` when absent); a ``ValueError`` naming the file when it is not
    JSON, not a ``kind`` or (a list) holds other than ``items`` (JSON builds only plain values: no object is ever
    constructed from a file)."""
    try:
        value = json.loads(meta.get(key, default))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({e}); the file is damaged or was not written by "
                         "kdinpaint.save_exported: export it again") from None
    bad_item = items is not None and isinstance(value, list) and not all(isinstance(v, items) and not isinstance(v, bool) for v in value)
    if not isinstance(value, kind) or isinstance(value, bool) or bad_item:
        what = f"a {kind.__name__}" + (f" of {items.__name__}" if items is not None else "")
        raise ValueError(f"{path}: metadata {key!r} is {reprlib.repr(value)}, not {what}; the file is damaged or was not written "
                         "by kdinpaint.save_exported: export it again")
    return value


def _meta_spec(meta: dict[str, str], path: Path) -> dict:
    """The spec stored in the metadata as a mapping, read with ``yaml.safe_load`` (a ``!!python/object`` tag, or any
    other tag that would construct an object, is refused, never run); a ``ValueError`` naming the file otherwise."""
    try:
        stored = yaml.safe_load(meta["kdinpaint.spec"])
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: metadata 'kdinpaint.spec' is not a plain YAML spec ({first}); kdinpaint reads no "
                         "tagged objects from a file. The file is damaged or crafted: export it again") from None
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: metadata 'kdinpaint.spec' holds a {type(stored).__name__}, not a spec mapping; "
                         "export the model again")
    return stored


def load_checkpoint(path: str | Path, expected: str | None = None, device: str | torch.device = "cpu") -> tuple[CompletedModel, str]:
    """Rebuild an exported model from its file alone (written with ``adapter=`` or ``target=``); returns it and
    ``name:variant`` (or the import path). ``expected`` refuses a checkpoint of another adapter or variant."""
    model, which, _ = load_checkpoint_adapter(path, expected, device)
    return model, which


def load_checkpoint_adapter(path: str | Path, expected: str | None = None,
                            device: str | torch.device = "cpu") -> tuple[CompletedModel, str, Adapter]:
    """:func:`load_checkpoint`, and the :class:`~kdinpaint.adapter.Adapter` that built it (its ``stride``): a
    registered adapter, or for a file of a network named by import path (``kdinpaint.target``) that class with the
    file's own spec, when it is importable here."""
    path = Path(path)
    meta = _metadata(path)
    kwargs = _meta_json(meta, "kdinpaint.builder_kwargs", path, "{}", dict)
    target = meta.get("kdinpaint.target")
    if target is not None:
        if expected is not None and expected != target:
            raise ValueError(f"{path} is a checkpoint of {target!r}, but {expected!r} was expected")
        stride = _meta_json(meta, "kdinpaint.stride", path, "1", int)
        if target.partition(":")[0].split(".")[0] in sys.stdlib_module_names:  # importing runs a module's code
            raise ValueError(f"{path} names {target!r} as its network, a module of Python's standard library, which "
                             "holds no network (and some act when imported); the file is damaged or crafted")
        adapter = adapter_from_target(target, _meta_spec(meta, path), stride)
        if not (isinstance(adapter.build_student, type) and issubclass(adapter.build_student, nn.Module)):
            # a file names what is called with its builder kwargs: only a network class, never any function
            raise ValueError(f"{path} names {target!r} as its network, which is not a torch.nn.Module class; a file may "
                             "only name a network class. Build the network yourself and use load_exported(path, model)")
        return load_exported(path, _build(adapter, None, kwargs, path), device), target, adapter
    which = meta.get("kdinpaint.adapter")
    if which is None:
        raise ValueError(f"{path} does not say which adapter it belongs to; use load_exported(path, fresh_model)")
    if expected is not None:
        e_name, _, e_variant = expected.partition(":")
        name, _, variant = which.partition(":")
        if e_name != name or (e_variant and e_variant != variant):
            raise ValueError(f"{path} is a checkpoint of {which!r}, but {expected!r} was expected")
    name, _, variant = which.partition(":")
    adapter = get_adapter(name)
    return load_exported(path, _build(adapter, variant or None, kwargs, path), device), which, adapter


def _build(adapter: Adapter, variant: str | None, kwargs: dict, path: Path) -> nn.Module:
    """The fresh student a file's ``kdinpaint.builder_kwargs`` describe; a builder that refuses them names the file."""
    try:
        return adapter.student(variant, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: the builder of {adapter.name!r} refuses the file's kdinpaint.builder_kwargs "
                         f"{reprlib.repr(kwargs)} ({type(e).__name__}: {e}); the file was written by another version "
                         "of the network, or is damaged: export it again") from None


def load_exported(path: str | Path, model: nn.Module, device: str | torch.device = "cpu") -> CompletedModel:
    """Rebuild a :class:`CompletedModel` around ``model`` (a fresh instance of the student's class)."""
    path = Path(path)
    meta = _metadata(path)
    stored = _meta_spec(meta, path)
    completion = stored.setdefault("completion", {})
    for key in ("kernel_limit", "offset_limit"):  # files written before the bounds existed: unbounded, as trained
        completion.setdefault(key, None)
    try:
        spec = AdapterSpec.from_dict(stored)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: metadata 'kdinpaint.spec' is not a valid spec ({e}); export the model again") from None
    sites = _meta_json(meta, "kdinpaint.sites", path, "[]", list, str)
    channels = _meta_json(meta, "kdinpaint.site_channels", path, "[]", list, int)
    c = spec.completion
    blocks = build_completion_blocks(channels, c.kernel_size, c.share_predictors, c.kernel_limit, c.offset_limit)
    fusion_sites = _meta_json(meta, "kdinpaint.fusion_sites", path, "[]", list, str)
    fusion_channels = _meta_json(meta, "kdinpaint.fusion_channels", path, "[]", list, int)
    fusions = build_fusions(fusion_channels, c.kernel_size, c.kernel_limit, c.offset_limit)
    origin = f" (exported from {meta['kdinpaint.adapter']!r})" if "kdinpaint.adapter" in meta else ""
    fix = "pass a fresh instance of the exported model's class, built with the same arguments"
    modules = dict(_modules.unwrap(model).named_modules())
    absent = [p for p in [*sites, *fusion_sites] if _modules.split_index(p)[0] not in modules]
    if absent:  # another architecture: its completion sites are not modules of this one
        raise ValueError(
            f"{path}{origin} does not fit {type(model).__name__}: its completion sites {absent[:5]} are not modules of "
            f"{type(model).__name__}; {fix}"
        )
    completed = CompletedModel(_modules.unwrap(model), spec, blocks, sites, fusions, fusion_sites)
    check_file_values(path, completed)  # integer / bool weights, NaN/inf parameters: named, never loaded
    try:
        missing, unexpected = load_model(completed, str(path), strict=False, device=str(device))
    except RuntimeError:  # shape mismatches: named one by one below
        missing, unexpected = ["?"], []
    if missing or unexpected:
        raise ValueError(f"{path}{origin} does not fit {type(model).__name__}: " + "; ".join(_file_report(path, completed)) + f"; {fix}")
    return completed


def is_exported(path: str | Path) -> bool:
    """Whether ``path`` is a file written by :func:`save_exported` (safetensors with ``kdinpaint.spec``)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return "kdinpaint.spec" in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - not safetensors (a .pth), unreadable: not an export
        return False


def load_network(path: str | Path, model: nn.Module, spec: SpecLike | None = None,
                 device: str | torch.device = "cpu") -> CompletedModel:
    """``model`` (a fresh instance of your network) with the weights of ``path``, ready to run or export.

    ``path`` is a file of :func:`save_exported` (its completion blocks and spec come with it; ``spec`` is then not
    needed) or a plain state dict of ``model`` (``.pth`` / ``.pt`` read with ``weights_only=True``, or
    ``.safetensors``), loaded strictly and wrapped without completion blocks; ``spec`` says how it is called
    (default ``model(image, mask)``). A file of another network is refused naming the keys that differ."""
    if is_exported(path):
        return load_exported(path, model, device)
    load_weights(model, path, f"state dict of {type(model).__name__}")
    return as_completed(model, spec).to(device)


def as_completed(model: nn.Module, spec: SpecLike | None = None) -> CompletedModel:
    """``model`` as it is (no completion blocks, no fusion) in a :class:`CompletedModel`, so that what runs and
    exports a trained student runs and exports it too; ``spec`` says how it is called (default ``model(image, mask)``)."""
    spec = load_spec(spec) if spec is not None else AdapterSpec()
    spec = dataclasses.replace(spec, completion_sites=[], attention_sites=[])  # nothing is added to the network
    return CompletedModel(_modules.unwrap(model), spec, nn.ModuleDict(), [])


def _file_report(path: Path, model: nn.Module) -> list[str]:
    """:func:`kdinpaint.weights.key_report` of the tensors in the safetensors ``path`` against ``model``, read
    as shapes only; a model key that shares its tensor with a stored one counts as present (safetensors
    stores a shared tensor once)."""
    from kdinpaint.weights import key_report

    with safe_open(str(path), framework="pt") as f:
        stored = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    own = model.state_dict()
    by_storage: dict[int, list[str]] = {}
    for k, v in own.items():
        if v.numel():
            by_storage.setdefault(v.untyped_storage().data_ptr(), []).append(k)
    for names in by_storage.values():
        present = [n for n in names if n in stored]
        if present and len(names) > 1:
            for n in names:
                stored.setdefault(n, torch.empty(own[n].shape, device="meta"))
    return key_report(stored, model) or ["the stored tensors do not load"]
