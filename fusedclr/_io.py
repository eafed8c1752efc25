"""Small file-system helpers shared by the command line and the tuning tools."""

from __future__ import annotations

import os
from pathlib import Path


def ensure_writable(path: str | os.PathLike[str]) -> None:
    """Makes ``path``'s folder and checks that ``path`` can be written, leaving it as it was.

    Raises the ``OSError`` that writing it at the end of a long run would have raised,
    before the run: a mistake in an output path then costs nothing.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    existed = target.exists()
    with open(target, "a"):
        pass
    if not existed:
        target.unlink()
