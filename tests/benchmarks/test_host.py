"""benchmarks/host.py: one record of the machine for every results file."""

from __future__ import annotations

import os
import platform

import torch

from benchmarks.host import host, version


def test_host_records_the_machine_versions_and_a_benchmarks_own_fields():
    h = host("numpy", "no-such-package-xyz", loadavg_1min_before=0.5)
    assert h["cpu_count"] == os.cpu_count() and h["machine"] == platform.machine()
    assert h["python"] == platform.python_version()
    assert h["torch"] == version("torch") and torch.__version__.startswith(h["torch"].split("+")[0])
    assert h["torch_threads"] == torch.get_num_threads()  # torch is imported here
    import numpy

    assert h["numpy"] == numpy.__version__ and h["no-such-package-xyz"] is None
    assert h["loadavg_1min_before"] == 0.5 and isinstance(h["loadavg_1min"], float)
