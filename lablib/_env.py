"""Small environment probes shared by several modules (kept free of torch and of other lablib modules)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def package_dir(module: str) -> Path | None:
    """Folder of an installed top-level package, found without running its `__init__` (data-only installs work)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def in_ipython_kernel() -> bool:
    """True inside a Jupyter kernel (not a plain `python`, not the IPython terminal)."""
    # a process that never imported IPython cannot be a kernel; do not import it just to ask
    ipython_module = sys.modules.get("IPython")
    if ipython_module is None:
        return False
    shell = ipython_module.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
