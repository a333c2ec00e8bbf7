"""Writes that never leave a half-written result: a directory is built beside its final place and renamed in.

A failed write (a full disk, a quota, a kill) removes what it wrote and leaves the previous contents of the
destination as they were; a full disk is reported as such, with the fix.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from sftlab.errors import SftlabError

DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""No space left, quota exceeded, file too large for the file system or the process's limit."""
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)
"""What a failed write raises: OSError from Python, SafetensorError from safetensors ("I/O error: ... (os
error 28)"), RuntimeError from torch.save's archive writer."""


class WriteError(SftlabError):
    """A result could not be written (the partial write was removed)."""


def describe(exc: BaseException) -> str:
    """A failed write as a user reads it: a full disk says so."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and (found := re.search(r"os error (\d+)", str(exc))):
        code = int(found.group(1))
    if code in DISK_ERRORS:
        return f"the disk is full or over quota ({os.strerror(code)}); free space there"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{str(exc).strip()} (if the disk is full, free space there)"


@contextmanager
def atomic_dir(final: str | Path, *, what: str) -> Iterator[Path]:
    """Yield a scratch dir beside `final`; when the block finishes, it replaces `final` (fsynced, renamed).
    If the block fails, the scratch dir is removed and `final` keeps its previous contents; a failed write
    (WRITE_ERRORS) becomes a WriteError that says so."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        sync_tree(tmp)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        sync_path(final.parent)
    except WRITE_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.rename(old, final)
        kept = f"; {final} keeps its previous contents" if final.exists() else ""
        raise WriteError(f"writing {what} to {final} failed: {describe(exc)}. The partial write was removed"
                         f"{kept}.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a UTF-8 text file beside its place and rename it in: a reader (or a kill) sees the old file or
    the new one, never half of one."""
    path = Path(path)
    scratch = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        scratch.write_text(text, encoding="utf-8")
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
    return path


def remove_scratch(directory: Path) -> list[str]:
    """Remove what interrupted writes left in `directory` (.NAME.tmp-PID, .NAME.old-PID, .NAME.trash-PID and
    checkpoints' .tmp-step-N-PID); an .old dir whose final dir is missing is put back. Returns the names removed."""
    removed = []
    if not directory.is_dir():
        return removed
    for child in sorted(directory.iterdir()):
        name = child.name
        if name.startswith(".") and ".old-" in name:
            final = directory / name[1:name.rindex(".old-")]
            if not final.exists():
                os.rename(child, final)
                continue
        if name.startswith(".") and any(mark in name for mark in (".tmp-", ".old-", ".trash-")):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            removed.append(name)
    return removed


def sync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            sync_path(path)
    sync_path(root)


def sync_path(path: Path) -> None:
    """fsync a file or a directory (its entries), so a rename after it publishes complete data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
