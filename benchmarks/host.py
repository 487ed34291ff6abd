"""The machine a benchmark ran on, written the same way into every results file.

    host("transformers", loadavg_1min_before=1.2)
    # {"cpu_count": 2, "machine": "x86_64", "python": "3.11.9", "torch": "2.14.1", "torch_threads": 1,
    #  "loadavg_1min": 1.3, "transformers": "4.57.1", "loadavg_1min_before": 1.2}
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any


def version(package: str) -> str | None:
    """An installed distribution's version, without importing it; None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def host(*packages: str, **extra: Any) -> dict[str, Any]:
    """Cores, architecture, Python and torch versions (and those of ``packages``), torch's intra-op
    threads when torch is imported, the 1-minute load average now, then ``extra`` (a benchmark's own
    fields, such as the load before and after its timed part)."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "machine": platform.machine(),
                            "python": platform.python_version(), "torch": version("torch")}
    torch = sys.modules.get("torch")
    if torch is not None:  # the threads a run used; a benchmark that never imported torch has none to report
        info["torch_threads"] = torch.get_num_threads()
    if hasattr(os, "getloadavg"):
        info["loadavg_1min"] = round(os.getloadavg()[0], 2)
    info.update({p: version(p) for p in packages})
    info.update(extra)
    return info
