"""Old import paths of modules that moved, kept working for a while with a ``DeprecationWarning`` naming the new one.

``import kdinpaint.objective`` (before the training modules moved into :mod:`kdinpaint.train`) returns the module
object of ``kdinpaint.train.objective`` itself, so classes, registries and ``isinstance`` checks are shared.

Names that left a module for another (the floor functions of ``kdinpaint.metrics`` went to
:mod:`kdinpaint.evaluation.floor`) are in :data:`MOVED_NAMES`; the module they left reads them through
:func:`moved_names`, its ``__getattr__``: the old ``from kdinpaint.metrics import compare_floor`` warns and works.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

__all__ = ["MOVED", "MOVED_NAMES", "install", "moved_names"]

MOVED = {
    "kdinpaint.recipe": "kdinpaint.train.recipe",
    "kdinpaint.runs": "kdinpaint.train.runs",
    "kdinpaint.report": "kdinpaint.train.report",
    "kdinpaint.objective": "kdinpaint.train.objective",
    "kdinpaint.bilevel": "kdinpaint.train.bilevel",
    "kdinpaint.averaging": "kdinpaint.train.averaging",
    "kdinpaint.metrics": "kdinpaint.evaluation.metrics",
    "kdinpaint.baselines": "kdinpaint.evaluation.baselines",
    "kdinpaint.compare": "kdinpaint.evaluation.compare",
    "kdinpaint.memory": "kdinpaint.inference.memory",
    "kdinpaint.timing": "kdinpaint.inference.timing",
    "kdinpaint.attention": "kdinpaint.pixel_attention",
    "kdinpaint.losses.attention": "kdinpaint.losses.attention_transfer",
}


_FLOOR = "kdinpaint.evaluation.floor"
_FLOOR_OF_METRICS = ("FLOOR_REFERENCE", "floor_gap", "floor_verdict", "gap_standard_error", "compare_floor",
                     "floor_to_markdown", "floor_to_csv")
_FLOOR_OF_INFERENCE = ("FLOOR_METHODS", "floor_methods", "Floor", "evaluate_floor", "evaluate_with_floor")

MOVED_NAMES: dict[str, dict[str, str]] = {
    # module the names left (under its new name) -> {name: module that holds it now}
    "kdinpaint.evaluation.metrics": {name: _FLOOR for name in _FLOOR_OF_METRICS},
    "kdinpaint.inference": {name: _FLOOR for name in (*_FLOOR_OF_INFERENCE, "compare_floor")},
}


def moved_names(module: str):
    """The ``__getattr__`` (PEP 562) of ``module``: a name of :data:`MOVED_NAMES` ``[module]`` is imported from its
    new module (by name, when first read, so the old module does not depend on the new one) with a
    ``DeprecationWarning``; any other missing name raises ``AttributeError`` as usual."""
    moved = MOVED_NAMES[module]

    def __getattr__(name: str):
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{name} moved to {moved[name]}; import it from there", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(moved[name]), name)

    return __getattr__


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        # stacklevel 2: the import statement (the import system's own frames are skipped)
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # the new module is already executed; the import system set its __spec__ to the old name's: put it back
        module.__spec__ = self._specs.pop(module.__spec__.name)


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
