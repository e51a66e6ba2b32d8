"""Old import paths of modules that moved, kept working for a while with a ``DeprecationWarning`` naming the new one.

``import kdinpaint.objective`` (before the training modules moved into :mod:`kdinpaint.train`) returns the module
object of ``kdinpaint.train.objective`` itself, so classes, registries and ``isinstance`` checks are shared.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["MOVED", "install"]

MOVED = {
    "kdinpaint.recipe": "kdinpaint.train.recipe",
    "kdinpaint.runs": "kdinpaint.train.runs",
    "kdinpaint.report": "kdinpaint.train.report",
    "kdinpaint.objective": "kdinpaint.train.objective",
    "kdinpaint.bilevel": "kdinpaint.train.bilevel",
    "kdinpaint.averaging": "kdinpaint.train.averaging",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):  # the new module is already executed
        pass


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
