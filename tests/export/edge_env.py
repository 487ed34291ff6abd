"""An environment with only numpy, Pillow and onnxruntime importable, for the edge-side subprocesses.

``python -I -S`` skips site-packages (and this project's editable install) entirely; the one folder
put on ``sys.path`` holds symlinks to just those three packages from the test venv.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# Top-level modules the edge side must never import.
FORBIDDEN = ("torch", "zoo", "training", "export", "timm", "transformers")


def edge_site(root: Path) -> Path:
    """``root/edge_site`` with symlinks to numpy, PIL and onnxruntime (and their bundled .libs folders)."""
    site = root / "edge_site"
    if site.is_dir():
        return site
    site.mkdir(parents=True)
    for pkg, dist in (("numpy", "numpy"), ("PIL", "pillow"), ("onnxruntime", "onnxruntime")):
        src = Path(importlib.util.find_spec(pkg).origin).parent
        (site / pkg).symlink_to(src)
        libs = src.parent / f"{dist}.libs"
        if libs.is_dir():
            (site / libs.name).symlink_to(libs)
    return site
