"""Finding modules by dotted path, through DDP / torch.compile wrappers, with helpful errors.

A tap is a module path, optionally followed by the index of one element of the module's output when its forward
returns a tuple or list: ``down1[0]`` is element 0 of what ``down1`` returns (:func:`split_index`).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
from collections.abc import Iterator
from typing import Any

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


def is_glob(pattern: str) -> bool:
    return any(c in split_index(pattern)[0] for c in "*?[")


_INDEX = re.compile(r"\[(-?\d+)\]\Z")


def split_index(path: str) -> tuple[str, int | None]:
    """``("down1", 0)`` for the tap ``down1[0]``, ``("down1", None)`` for ``down1``: a trailing ``[N]`` (digits only)
    names element N of the module's tuple output; any other bracket is a glob character class."""
    m = _INDEX.search(path)
    if m is None:
        return path, None
    return path[: m.start()], int(m.group(1))


def element(output: Any, index: int | None) -> Any:
    """Element ``index`` of a module's tuple or list output (``output`` itself for ``None``)."""
    return output if index is None else output[index]


def replace_element(output: Any, index: int | None, value: Any) -> Any:
    """``output`` with element ``index`` replaced by ``value``, the other elements the same objects, in a container of
    the same type (a named tuple stays one); ``value`` itself for ``None``."""
    if index is None:
        return value
    items = list(output)
    items[index] = value
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a named tuple
        return type(output)(*items)
    return type(output)(items)


def _segment_regex(segment: str) -> str:
    """One path segment of a glob: ``*`` any run of characters without a dot, ``?`` one, ``[...]`` a class."""
    out, i = [], 0
    while i < len(segment):
        c = segment[i]
        if c == "*":
            out.append("[^.]*")
        elif c == "?":
            out.append("[^.]")
        elif c == "[":
            end = segment.find("]", i + 2 if segment[i + 1 : i + 2] in ("!", "]") else i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = segment[i + 1 : end]
                body = "^" + body[1:] if body.startswith("!") else body
                out.append(f"(?!\\.)[{body.replace(chr(92), chr(92) * 2)}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern:
    """The regular expression of a module-path glob: ``*``, ``?`` and ``[...]`` stay within one dotted
    segment; a segment ``**`` matches any number of segments (none between two others, at least one at the end)."""
    segments = pattern.split(".")
    out = ""
    for i, seg in enumerate(segments):
        first, last = i == 0, i == len(segments) - 1
        if seg == "**":
            if first and last:
                out += r"[^.]+(?:\.[^.]+)*"
            elif first:
                out += r"(?:[^.]+\.)*"
            elif last:
                out += r"(?:\.[^.]+)+"
            else:
                out += r"(?:\.[^.]+)*"
            continue
        sep = "" if first or segments[i - 1] == "**" and i == 1 else r"\."
        out += sep + _segment_regex(seg)
    return re.compile(out + r"\Z")


def glob_match(name: str, pattern: str) -> bool:
    """Whether the dotted module path ``name`` matches ``pattern`` (see :func:`glob_regex`)."""
    return glob_regex(pattern).match(name) is not None


def resolve(model: nn.Module, patterns: list[str], *, what: str) -> list[str]:
    """Expand paths and globs against ``model.named_modules()`` (in module order), or raise ``ValueError``.

    Globs follow :func:`glob_regex`: ``*`` stays within one path segment, ``**`` spans segments. A path that
    matches nothing is reported with the closest module names; duplicates are dropped. A trailing element index
    (``down*[0]``) is kept on every module the path matches.
    """
    names = [n for n, _ in model.named_modules() if n]
    known = set(names)
    out: list[str] = []
    for raw in patterns:
        pattern, index = split_index(normalise_path(raw))
        suffix = "" if index is None else f"[{index}]"
        if is_glob(pattern):
            hits = [n for n in names if glob_match(n, pattern)]
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
        out.extend(h + suffix for h in hits if h + suffix not in out)
    return out


def get(model: nn.Module, path: str) -> nn.Module:
    """The module of a path or tap (``down1`` for ``down1[0]``)."""
    return model.get_submodule(split_index(path)[0])


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
