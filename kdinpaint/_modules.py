"""Finding modules by dotted path, through DDP / torch.compile wrappers, with helpful errors."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from collections.abc import Iterator

from torch import nn

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else None
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def normalise_path(path: str) -> str:
    """Drop wrapper prefixes so ``module.encoder.3`` and ``encoder.3`` name the same module."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if path.startswith(prefix):
                path, changed = path[len(prefix) :], True
    return path


def resolve(model: nn.Module, patterns: list[str], *, what: str) -> list[str]:
    """Expand paths and globs against ``model.named_modules()`` (in module order), or raise ``ValueError``.

    A path that matches nothing is reported with the closest module names; duplicates are dropped.
    """
    names = [n for n, _ in model.named_modules() if n]
    known = set(names)
    out: list[str] = []
    for raw in patterns:
        pattern = normalise_path(raw)
        if any(c in pattern for c in "*?["):
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ValueError(
                    f"{what}: the glob {raw!r} matches no module of {type(model).__name__}; "
                    f"module names look like {_closest(pattern, names)}"
                )
        elif pattern in known:
            hits = [pattern]
        else:
            raise ValueError(
                f"{what}: {type(model).__name__} has no module {raw!r}; closest names: {_closest(pattern, names)} "
                "(print(dict(model.named_modules()).keys()) lists them all)"
            )
        out.extend(h for h in hits if h not in out)
    return out


def get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _closest(pattern: str, names: list[str], n: int = 5) -> list[str]:
    close = difflib.get_close_matches(pattern, names, n=n, cutoff=0.3)
    return close or names[:n]


@contextlib.contextmanager
def training_mode(model: nn.Module, mode: bool) -> Iterator[None]:
    """``model.train(mode)`` within the block; afterwards every submodule gets its own flag back (a model
    may be partly frozen in eval mode, so ``model.train(previous)`` would not restore it)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(mode)
        yield
    finally:
        for m, flag in flags:
            m.training = flag
