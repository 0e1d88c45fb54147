"""``python -m lowbit.reports.measured PEAK_FILE ARGS...``: run ``lowbit ARGS...`` and, as it
exits, write its own peak resident memory (bytes, the kernel's VmHWM) to PEAK_FILE.

The kernel's count for a child (``wait4``'s ``ru_maxrss``) is no use when the parent is
larger than the child: Linux carries the parent's high-water mark into a forked child, so
every step `lowbit report` ran after it had loaded a model for the roofline was recorded at
the parent's size (SmolLM2's RTN step at 1,993 MB). VmHWM belongs to the memory the child
builds after ``exec`` and counts only what lowbit itself touched.
"""

from __future__ import annotations

import atexit
import runpy
import sys


def _write_peak(path: str) -> None:
    with open("/proc/self/status") as status:
        kilobytes = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    with open(path, "w") as out:
        out.write(f"{kilobytes * 1024}\n")


if __name__ == "__main__":
    peak_file = sys.argv.pop(1)
    atexit.register(_write_peak, peak_file)
    runpy.run_module("lowbit.cli", run_name="__main__", alter_sys=True)
