"""Memory figures of the running process from /proc/self/status (Linux), for
the benchmarks that measure peak RSS. Imports nothing but the standard
library, so it also serves the worker that runs in kvpress's environment."""


import ctypes
import gc


def release_freed_memory() -> None:
    """Return freed heap pages to the system (glibc's malloc_trim, where
    there is one), so that a call after this one cannot reuse them without
    its resident size growing."""
    gc.collect()
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


def status_bytes(field: str) -> int:
    """A /proc/self/status field given in kB (VmRSS, VmHWM, ...), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: clear_refs 5), so that the next
    reading of it is the peak of what runs after this call."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
