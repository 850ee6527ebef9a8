"""What a stage cost: wall seconds and peak resident memory (of this process, and of the largest child process such
as a benchmark subprocess when one ran), recorded by the runner in every run's result.json."""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

_KB = 1024 if sys.platform != "darwin" else 1024 * 1024  # ru_maxrss units: KB on Linux, bytes on macOS


def _reset_peak() -> None:
    """Reset this process's peak RSS (Linux: "5" to /proc/self/clear_refs); where that is not possible, the peak
    stays the process's since it started."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    """This process's peak RSS in MiB since the last reset (VmHWM), else since it started (ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _KB


@contextmanager
def measured(memory: bool = True):
    """Inside: the work to measure; yields a dict filled on exit with "run_s" and, with memory, "peak_rss_mb" (since
    entry where the OS can reset the peak, else since the process started) and, when a child process that ran inside
    reached a new high, "child_peak_rss_mb". memory=False for work that measures its own parts (a pipeline: each of
    its stages resets the peak)."""
    out: dict = {}
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if memory:
        _reset_peak()
    t0 = time.perf_counter()
    try:
        yield out
    finally:  # also when the work raised: the exception goes on
        out["run_s"] = round(time.perf_counter() - t0, 1)
        if memory:
            out["peak_rss_mb"] = round(_peak_mb(), 1)
            after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            if after > children:
                out["child_peak_rss_mb"] = round(after / _KB, 1)
