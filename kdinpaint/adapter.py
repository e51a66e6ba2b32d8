"""``Adapter``: the small interface every network offers to kdinpaint (built-in or from a plugin).

An adapter bundles a spec (what to hook, how to call) with constructors. Distillation code talks only to
this interface: ``build_student()``, ``build_teacher()``, ``spec`` (with its named variants) and, for
official weights, ``checkpoint_filter_fn``.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from kdinpaint.spec import AdapterSpec

__all__ = ["Adapter"]


@dataclass
class Adapter:
    """A registered network.

    Args:
        name: registry name (``kdinpaint adapters`` lists it; ``attach(..., spec="name:variant")`` uses it).
        spec: its :class:`AdapterSpec`, variants included.
        build_student: ``(**kwargs) -> nn.Module``, the inpainting network called as the spec says.
        build_teacher: ``(**kwargs) -> nn.Module``, the auxiliary network; default: ``build_student``.
        description: one line for listings.
        checkpoint_filter_fn: ``(state_dict, model) -> state_dict`` remapping official weights.
        stride: sizes must be a multiple of this (the framework pads and crops back).
        variant_builders: per variant, keyword arguments for ``build_student`` (e.g. an edge stage dropped).
    """

    name: str
    spec: AdapterSpec
    build_student: Callable[..., nn.Module]
    build_teacher: Callable[..., nn.Module] | None = None
    description: str = ""
    checkpoint_filter_fn: Callable[[dict, nn.Module], dict] | None = None
    stride: int = 1
    variant_builders: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or ":" in self.name:
            raise ValueError(f"adapter name must be a non-empty string without ':', got {self.name!r}")
        if not isinstance(self.spec, AdapterSpec):
            self.spec = AdapterSpec.from_dict(self.spec)
        if self.spec.name == "custom" or not self.spec.description:  # a spec written without them
            self.spec = dataclasses.replace(
                self.spec,
                name=self.name if self.spec.name == "custom" else self.spec.name,
                description=self.spec.description or self.description,
            )
        unknown = [v for v in self.variant_builders if v not in self.spec.variants]
        if unknown:
            raise ValueError(f"adapter {self.name!r}: variant_builders for unknown variants {unknown}")

    @property
    def variants(self) -> list[str]:
        return sorted(self.spec.variants)

    def student(self, variant: str | None = None, **kwargs: Any) -> nn.Module:
        """Build the student for a variant (its builder arguments merged under ``kwargs``)."""
        return self.build_student(**{**self.variant_builders.get(variant or "", {}), **kwargs})

    def teacher(self, variant: str | None = None, **kwargs: Any) -> nn.Module:
        build = self.build_teacher or self.build_student
        return build(**{**self.variant_builders.get(variant or "", {}), **kwargs})

    def keyword_names(self, error: str = "") -> list[str]:
        """The keyword arguments ``build_student`` accepts: its named parameters and, when it forwards
        ``**kwargs``, those of what it forwards them to: the callable a TypeError message ``error`` names
        (``StructureFlow.__init__() got ...``) and the classes of its return annotation (for a message that
        lists the valid names when a ``model.kwargs`` key is not one)."""
        return list(self._keyword_parameters(error))

    def check_kwargs(self, kwargs: dict[str, Any], key: str = "model.kwargs") -> None:
        """Refuse, naming ``key``, a builder argument whose value cannot be what the builder's default is: a string
        or a float where the default is an int (``width: "8"`` in YAML) or a bool where it is a number; a
        parameter annotated to take a string or None (``prefill: bool | str``) is left to the builder."""
        params = self._keyword_parameters()
        for name, value in kwargs.items():
            param = params.get(name)
            if param is None or isinstance(param.default, bool) or not isinstance(param.default, (int, float)):
                continue
            annotation = str(param.annotation)
            if (value is None and "None" in annotation) or (isinstance(value, str) and "str" in annotation):
                continue
            want = "int" if isinstance(param.default, int) else "float"
            fits = isinstance(value, int) or (want == "float" and isinstance(value, float))
            if isinstance(value, bool) or not fits:
                if want == "int" and isinstance(value, float) and "float" in annotation:
                    continue
                hint = (f"; write {name}: {value.strip()} without quotes" if isinstance(value, str)
                        and value.strip().lstrip("-").replace(".", "", 1).isdigit() else "")
                raise ValueError(
                    f"{key}.{name} of the {self.name} builder must be {'an int' if want == 'int' else 'a number'} "
                    f"(its default is {param.default!r}), got {value!r} ({type(value).__name__}){hint}"
                )

    def _keyword_parameters(self, error: str = "") -> dict[str, inspect.Parameter]:
        """:meth:`keyword_names` with each one's ``inspect.Parameter`` (its default and annotation)."""
        builder = self.build_student
        module = inspect.getmodule(builder)
        params = dict(inspect.signature(builder).parameters)
        names = str(getattr(builder, "__annotations__", {}).get("return", "")).split("|")
        names.append(error.partition("()")[0].removesuffix(".__init__"))
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            for target in {getattr(module, n.strip(), None) for n in names} - {None, builder}:
                if callable(target):
                    params.update(inspect.signature(target).parameters)
        return {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"}
