"""What lowbit asks of the machine's memory: how much is free, and an allocator that gives
freed blocks back (no torch here: the CLI calls these before importing it)."""

from __future__ import annotations

import logging
from functools import lru_cache

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _libc():
    """The C library, looked up once (`find_library` runs ldconfig in a subprocess), or
    None where it cannot be loaded."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


def return_freed_memory() -> None:
    """Make glibc hand every allocation of 1 MB or more back to the system when it is
    freed (M_MMAP_THRESHOLD fixed at 1 MB). By default the threshold rises as large blocks
    are freed, after which a streamed run's block-sized tensors come from the heap and
    their freed pages stay resident: a 1.1B model streamed with RTN peaked at 2.3 GB that
    way, 1.3 GB with the threshold fixed when the process starts, 1.95 GB with it fixed
    just before the first block (so `lowbit quantize --low-memory` sets it first thing).
    Only for streamed runs: every large allocation then maps fresh pages, which costs
    evaluation loops time. Nothing happens where the C library is not glibc."""
    import ctypes

    try:
        _libc().mallopt(ctypes.c_int(-3), ctypes.c_int(1 << 20))  # M_MMAP_THRESHOLD is -3 in glibc's malloc.h
    except (OSError, AttributeError, TypeError):
        log.info("could not set the allocator's mmap threshold (not glibc); freed blocks may stay resident")


def trim_heap() -> None:
    """Hand the allocator's free pages back to the system now (glibc's malloc_trim, every
    arena). Streamed runs call it after each released block: with the mmap threshold fixed
    late (`return_freed_memory` after torch has freed large tensors) a 7B model's streamed
    evaluation otherwise grew by about one batch of hidden states (29 MB) per block in some
    runs and not in others (which thread's arena served a tensor), and by none with a trim
    after every block (four runs out of four). Nothing happens where the C library is not glibc."""
    import ctypes

    try:
        _libc().malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError, TypeError):
        pass


def resident_bytes() -> int:
    """This process's resident memory now, in bytes (/proc/self/statm)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_memory() -> int:
    """Bytes of memory free for a new allocation now (MemAvailable of /proc/meminfo)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise LowbitError("/proc/meminfo has no MemAvailable; give --max-memory")
