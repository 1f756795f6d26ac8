"""The processor this process runs on; stdlib only, so the worker imports it cheaply."""

from __future__ import annotations

import platform
from pathlib import Path

# /proc/cpuinfo keys naming the processor: x86 ("model name"), ARM boards ("Model", "Hardware").
_CPUINFO_KEYS = ("model name", "Model", "Hardware")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), or the platform's best guess."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in _CPUINFO_KEYS:
            return value.strip()
    return platform.processor() or platform.machine()
