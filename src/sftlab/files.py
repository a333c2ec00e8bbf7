"""Writes that never leave a half-written result, and never touch what is not theirs.

- A directory is built beside its final place and renamed in; a failed write (a full disk, a quota, a kill)
  removes what it wrote and leaves the previous contents of the destination as they were; a full disk is
  reported as such, with the fix.
- A run dir's manifest (OUTPUT/.sftlab-manifest.json) names the entries the run wrote. It is updated
  (atomically) before each new entry is written, so whatever the run leaves, even when killed, is named
  there. Everything else in the dir is the user's: a run never writes, replaces or removes it, and never
  writes through a symlink (`owned` refuses both).
"""

from __future__ import annotations

import errno
import json
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


MANIFEST = ".sftlab-manifest.json"
"""The run dir's list of its own entries (top-level names)."""
CONTROL_NAMES = (MANIFEST, ".sftlab.lock")
"""sftlab's own bookkeeping in a run dir (the manifest, the lock), never listed in the manifest."""


class WriteError(SftlabError):
    """A result could not be written (the partial write was removed)."""


class ForeignPathError(SftlabError):
    """A write would replace, remove or write through something sftlab did not write."""


def manifest(run_dir: str | Path) -> list[str] | None:
    """The names the run dir's manifest lists, or None when the dir has none (not a run's, or a run made by
    sftlab before manifests: train/rundir.py decides about those)."""
    path = Path(run_dir) / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ForeignPathError(f"{path} is unreadable, so what the run in {run_dir} wrote is unknown; nothing "
                               "there is written or removed. Restore the file, or set another output_dir.") from None
    names = record.get("files") if isinstance(record, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) and _plain_name(n) for n in names):
        raise ForeignPathError(f"{path} does not list the run's files (a \"files\" list of names); nothing in "
                               f"{run_dir} is written or removed. Restore it, or set another output_dir.")
    return names


def write_manifest(run_dir: str | Path, names: list[str] | set[str]) -> None:
    """Record `names` as the run dir's own entries (atomically: a reader sees the old list or the new one)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / MANIFEST).is_symlink():
        raise ForeignPathError(f"{run_dir / MANIFEST} is a symlink; sftlab never writes through a symlink in a run "
                               "dir. Remove it, or set another output_dir.")
    record = {"sftlab": "the files this run wrote; only these are ever replaced or removed",
              "files": sorted(set(names))}
    write_text_atomic(run_dir / MANIFEST, json.dumps(record, indent=1) + "\n")


def owned(run_dir: str | Path, name: str) -> Path:
    """RUN/NAME for a write by the run: recorded in the manifest before anything is written there. Refused
    (ForeignPathError) when NAME is a symlink, or exists but the manifest does not name it (the user's)."""
    run_dir = Path(run_dir)
    if not _plain_name(name) or name in CONTROL_NAMES:
        raise ValueError(f"not a run file name: {name!r}")
    path = run_dir / name
    names = manifest(run_dir)
    refuse_foreign(path, names or [])
    if names is None or name not in names:
        write_manifest(run_dir, [*(names or []), name])
    return path


def refuse_foreign(path: Path, names: list[str] | set[str]) -> None:
    """Refuse a write at PATH (an entry of a run dir) when it is a symlink or exists without being listed."""
    if path.is_symlink():
        raise ForeignPathError(f"{path} is a symlink (to {os.readlink(path)}); sftlab never writes through a symlink "
                               "in a run dir. Remove the link, or set another output_dir.")
    if path.exists() and path.name not in names:
        raise ForeignPathError(f"{path} was not written by this sftlab run (its {MANIFEST} does not name it), so it "
                               "is never replaced; move it away, or set another output_dir.")


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


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


def remove_scratch(directory: Path, names: list[str] | set[str] | None = None) -> list[str]:
    """Remove what interrupted writes left in `directory` (.NAME.tmp-PID, .NAME.old-PID, .NAME.trash-PID and
    checkpoints' .tmp-step-N-PID); an .old dir whose final dir is missing is put back. Given `names` (a run
    dir's manifest), only the scratch of those names (and of sftlab's own files) is touched: a user's
    `.notes.tmp-1` is not scratch of ours. Returns the names removed."""
    removed = []
    if not directory.is_dir():
        return removed
    for child in sorted(directory.iterdir()):
        name = child.name
        if names is not None and _scratch_of(name) not in {*names, *CONTROL_NAMES}:
            continue
        if name.startswith(".") and ".old-" in name:
            final = directory / name[1:name.rindex(".old-")]
            if not final.exists():
                os.rename(child, final)
                continue
        if name.startswith(".") and any(mark in name for mark in (".tmp-", ".old-", ".trash-")):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            removed.append(name)
    return removed


def _scratch_of(name: str) -> str | None:
    """NAME for a scratch entry .NAME.tmp-PID / .NAME.old-PID / .NAME.trash-PID; None for anything else."""
    found = re.fullmatch(r"\.(.+)\.(?:tmp|old|trash)-\d+", name)
    return found.group(1) if found else None


def remove_stale_scratch(final: str | Path) -> list[str]:
    """Remove the scratch a killed write of `final` left beside it (.NAME.tmp-PID, .NAME.old-PID of a process
    that no longer runs; an .old one is put back when `final` is missing), so a killed merge does not leave a
    model-sized hidden dir for good. A live process's scratch is left alone. Returns the names removed."""
    final = Path(final)
    removed: list[str] = []
    if not final.parent.is_dir():
        return removed
    for child in sorted(final.parent.iterdir()):
        found = re.fullmatch(r"\.(.+)\.(tmp|old)-(\d+)", child.name)
        if not found or found.group(1) != final.name or pid_alive(int(found.group(3))):
            continue
        if found.group(2) == "old" and not final.exists() and not final.is_symlink():
            os.rename(child, final)
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed.append(child.name)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (ours or another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


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


@contextmanager
def atomic_file(final: str | Path, *, what: str) -> Iterator[Path]:
    """Yield a scratch path beside the file `final`; when the block finishes, the scratch file (fsynced)
    replaces `final`. If the block fails, the scratch file is removed and `final` is as it was; a failed
    write (WRITE_ERRORS) becomes a WriteError that says so."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    scratch.unlink(missing_ok=True)
    try:
        yield scratch
        sync_path(scratch)
        os.replace(scratch, final)
        sync_path(final.parent)
    except WRITE_ERRORS as exc:
        scratch.unlink(missing_ok=True)
        kept = f"; {final} keeps its previous contents" if final.exists() else ""
        raise WriteError(f"writing {what} to {final} failed: {describe(exc)}. The partial write was removed"
                         f"{kept}.") from None
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
