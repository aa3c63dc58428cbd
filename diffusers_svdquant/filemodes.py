"""The mode a new file should have: what ``open()`` gives under the process umask.

safetensors 0.8 creates every file 0600 whatever the umask (safetensors issue #782), and ``mkstemp`` does
the same by design; files this package writes (checkpoints through :func:`~.hub.save_quantized`,
calibration files, the checksum list) are set back to the mode a plain ``open()`` would have given them, so a
shared model folder stays readable to whom the user's umask allows.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

_lock = threading.Lock()


def umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _lock:  # setting and restoring is the only portable read; keep two threads from interleaving it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def as_new_files(paths: Iterable[str | os.PathLike]) -> None:
    """Give each file the mode ``open()`` creates files with under the current umask (``0o666 & ~umask``)."""
    mode = 0o666 & ~umask()
    for path in paths:
        os.chmod(path, mode)
