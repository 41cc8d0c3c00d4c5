"""Memory figures of this process from /proc/self/status (Linux), shared by the benchmarks."""
from __future__ import annotations


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB, e.g. ``VmRSS`` or ``VmHWM`` (the resident high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field")
