"""Files kdinpaint writes get the permissions of any file the user creates: ``0666`` less the umask (``0644`` under
the usual ``022``). safetensors writes its files ``0600``, which would keep a shared run folder or an exported
model from the other users of a machine; :func:`usual_permissions` is applied to each such file before it is renamed
into place."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["usual_permissions", "umask"]


def umask() -> int:
    """This process's umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def usual_permissions(*paths: str | os.PathLike[str]) -> None:
    """Give each file in ``paths`` (a folder: every file below it) mode ``0666 & ~umask``."""
    mode = 0o666 & ~umask()
    for path in map(Path, paths):
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for f in files:
            os.chmod(f, mode)
