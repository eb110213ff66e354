"""Files shipped inside installed PyPI packages, found without importing them."""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path


def package_file(package: str, relpath: Sequence[str]) -> Path | None:
    """Path of ``relpath`` inside the installed ``package``, or None when either is missing."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*relpath)
        if path.is_file():
            return path
    return None
