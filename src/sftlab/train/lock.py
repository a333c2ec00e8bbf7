"""One run per output dir: OUTPUT/.sftlab.lock holds the pid, process start time and host of the process
using it.

A second run pointed at a dir in use is refused before it writes anything there; a lock left by a process
that no longer exists (killed, machine rebooted, or its pid now reused by another program) is taken over
with a note. The same process may take its own lock again (prepare, then train, in one program).

Atomic: the lock is written whole under a temporary name and then hard-linked to its name — a link never
replaces an existing file, so exactly one of two racing processes gets it, and nobody ever reads a lock
that is half written. Taking over a stale lock happens under a short flock of the dir, re-reading the lock
there, so two processes that both found it stale cannot both remove a lock and both win.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from sftlab.errors import SftlabError

LOCK_NAME = ".sftlab.lock"


class RunInUseError(SftlabError):
    """Another live process holds the output dir."""


def acquire(run_dir: Path) -> Path:
    """Take OUTPUT/.sftlab.lock for this process, or raise RunInUseError naming the holder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    mine = _me()
    for _ in range(5):
        if _link_new(path, mine):
            return path
        holder = _holder(path)
        if not holder and not path.exists():
            continue  # released between our link and our read: try again
        if _same_process(holder, mine):
            return path  # this process already holds it
        _refuse_if_held(run_dir, path, holder, mine)
        with _dir_locked(run_dir):  # its process is gone: remove it, unless someone replaced it meanwhile
            if _holder(path) == holder:
                path.unlink(missing_ok=True)
    raise RunInUseError(f"could not take {path}: other runs keep taking it at the same moment; set another "
                        "output_dir.")


def release(run_dir: Path) -> None:
    """Remove the lock if this process holds it."""
    path = Path(run_dir) / LOCK_NAME
    with _dir_locked(Path(run_dir)):
        if _same_process(_holder(path), _me()):
            path.unlink(missing_ok=True)


def _me() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": process_start(pid),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _link_new(path: Path, record: dict) -> bool:
    """Create `path` holding `record`, complete, if it does not exist; False when it does."""
    # Named as files.py names scratch (.NAME.tmp-PID): what a kill right here leaves is removed as such.
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "w", encoding="utf-8") as file:
            json.dump(record, file)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temp, path)  # fails if `path` exists; never replaces it
        except FileExistsError:
            return False
        except FileNotFoundError:  # the holder's scratch cleanup removed our temp: it holds the lock
            return False
        return True
    finally:
        temp.unlink(missing_ok=True)


def _refuse_if_held(run_dir: Path, path: Path, holder: dict, mine: dict) -> None:
    if holder.get("host") not in (None, mine["host"]):
        raise RunInUseError(f"{run_dir} is locked by a run on host {holder['host']} (pid {holder.get('pid')}); "
                            f"if that run is gone, delete {path}.")
    if _alive(holder.get("pid"), holder.get("start")):
        raise RunInUseError(f"{run_dir} is in use by another sftlab run (pid {holder['pid']}, since "
                            f"{holder.get('since', '?')}); wait for it to finish, or set another output_dir.")


def _same_process(holder: dict, mine: dict) -> bool:
    return all(holder.get(key) == mine[key] for key in ("pid", "host", "start"))


@contextlib.contextmanager
def _dir_locked(run_dir: Path) -> Iterator[None]:
    """An exclusive flock on the dir itself for a few file operations; the kernel drops it if we die, so
    it can never go stale. Where flock is unavailable (not POSIX), the operations run unguarded."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError:  # the dir is gone: nothing to guard
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def process_start(pid: int) -> str | None:
    """When process `pid` started, as an opaque string that differs for a later process given the same pid;
    None if unknown. Linux: the boot id and /proc/PID/stat's field 22 (start time in clock ticks since
    boot); elsewhere `ps -o lstart=` (to the second)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None  # Linux, and no such process
    except OSError:
        return None
    else:
        # Fields after the command name, which is in parentheses and may itself hold spaces and ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot = ""
        return f"{boot}:{fields[19]}"  # field 22 of the whole line is the 20th after the name
    try:
        out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _alive(pid: object, start: object) -> bool:
    """Whether the process that wrote a lock still runs: its pid exists and, when the lock recorded a start
    time, the process with that pid started then (else the pid was reused by another process)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    if start is None:
        return True  # a lock without a start time: the pid alone decides
    now = process_start(pid)
    return now is None or now == start
