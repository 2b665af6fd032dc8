"""What the host machine reports about its memory (Linux ``/proc/meminfo``), for size checks and planning."""

from __future__ import annotations


def meminfo_bytes(field: str) -> int | None:
    """A ``/proc/meminfo`` field (``MemAvailable``, ``SwapTotal``, ...) in bytes; None where the OS has no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
