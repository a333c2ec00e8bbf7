"""The C library's own functions where Python has no wrapper: glibc's allocator settings (the streaming load)
and Linux's parent-death signal (the encoding workers). One loader, so that each caller only asks for a
function by name and gets None where the platform has none (macOS has no mallopt, musl no malloc_trim)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_LIB: Any = None


def function(name: str) -> Callable[..., int] | None:
    """The C function `name` of this process's C library, or None where there is none."""
    global _LIB
    if _LIB is None:
        try:
            import ctypes

            _LIB = ctypes.CDLL(None, use_errno=True)  # the symbols already loaded: the process's own libc
        except OSError:
            _LIB = False
    return getattr(_LIB, name, None) if _LIB else None
