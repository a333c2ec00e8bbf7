"""One run per output dir: OUTPUT/.sftlab.lock holds the pid and host of the process using it.

A second run pointed at a dir in use is refused before it writes anything there; a lock left by a process
that no longer exists (killed, machine rebooted) is taken over with a note. The same process may take its
own lock again (prepare, then train, in one program).
"""

from __future__ import annotations

import json
import os
import socket
import time
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
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder.get("pid") == mine["pid"] and holder.get("host") == mine["host"]:
                return path  # this process already holds it
            if holder.get("host") == mine["host"] and _alive(holder.get("pid")):
                raise RunInUseError(f"{run_dir} is in use by another sftlab run (pid {holder['pid']}, since "
                                    f"{holder.get('since', '?')}); wait for it to finish, or set another "
                                    "output_dir.") from None
            if holder.get("host") not in (None, mine["host"]):
                raise RunInUseError(f"{run_dir} is locked by a run on host {holder['host']} (pid {holder.get('pid')}); "
                                    f"if that run is gone, delete {path}.") from None
            path.unlink(missing_ok=True)  # its process is gone: a stale lock
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(mine, file)
        return path
    raise RunInUseError(f"could not take {path}: another run took it at the same moment; set another output_dir.")


def release(run_dir: Path) -> None:
    """Remove the lock if this process holds it."""
    path = Path(run_dir) / LOCK_NAME
    holder = _holder(path)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
