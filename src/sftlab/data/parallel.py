"""Process-parallel encoding (data.num_workers): worker processes render, tokenise and label batches of
conversations; the parent reads and validates the rows, hands the batches out in turn and takes the results
back in input order, so what it writes (examples, rejects, stats, errors) is exactly what one process writes.

- Start: each worker is a fresh interpreter (never a fork of a process that may hold threads, locks or the
  tokenizer's Rust thread pool; nor multiprocessing's spawn, which imports the parent's main script again);
  each rebuilds the Encoder from a pickled recipe (tokenizer, template
  with its clock, settings) and tokenises on its own thread only (TOKENIZERS_PARALLELISM=false: the workers
  are the parallelism).
- Memory: at most IN_FLIGHT batches per worker are out at a time; a worker's reader thread takes each batch
  off its pipe as it comes, so the parent never blocks on a full pipe while the worker writes its results.
- End: the parent closes the pipes and joins the workers when the stream ends, and terminates them when it
  stops early (a data error, Ctrl-C, an exception). A worker whose parent dies (SIGKILL included) sees its
  task pipe close and exits; on Linux the kernel also kills it (PR_SET_PDEATHSIG). Workers ignore SIGINT:
  Ctrl-C is the parent's to handle, and it stops them.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import traceback
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from sftlab import libc
from sftlab.config import check_num_workers
from sftlab.data.templates import Segment
from sftlab.errors import ConfigError, DataError

MAX_WORKERS = 8
"""`auto` uses at most this many workers (the parent reads and writes on one core: more rarely pay)."""
MIN_AUTO_CORES = 3
"""`auto` starts workers only with this many usable cores: in one process, tokenising on a second thread already
keeps ~1.5 cores busy, and workers cost CPU of their own (each batch pickled both ways, a tokenizer and token
cache per worker): on 2 cores shared with other work they were measured slower (336 vs 468 tool-calling
conversations per CPU-second, and lower conversations/s at load average ~8)."""
MIN_PARALLEL_BYTES = 16 << 20
"""`auto` encodes inputs smaller than this in-process: starting workers (a fresh interpreter each, the tokenizer
loaded) costs about what they save on ~5k conversations."""
IN_FLIGHT = 2
"""Batches out per worker at a time: one being encoded, one waiting, so a worker never idles between batches."""


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as taskset / cgroups cpusets set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def encoding_ranks(shared_cache: bool) -> int:
    """How many processes of this machine encode the same data at once: under torchrun, rank 0 alone when the
    ranks share the cache (the others wait, then read it), every local rank when each encodes its own copy."""
    if shared_cache:
        return 1
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def worker_count(setting: int | str, input_bytes: int | None, *, ranks: int = 1) -> int:
    """Worker processes for data.num_workers: an int as given; `auto` the usable cores (at most MAX_WORKERS;
    shared among `ranks` processes encoding at once), or 1 (in-process) for an input under MIN_PARALLEL_BYTES
    or with fewer than MIN_AUTO_CORES cores. `input_bytes` None: unknown (a Hub dataset), taken as large."""
    if setting == "auto":
        cores = min(usable_cores() // max(ranks, 1), MAX_WORKERS)
        if cores < MIN_AUTO_CORES or (input_bytes is not None and input_bytes < MIN_PARALLEL_BYTES):
            return 1
        return cores
    check_num_workers(setting)
    return setting


def _die_with_parent() -> None:
    """Linux: the kernel sends this process SIGKILL when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    prctl = libc.function("prctl")
    if prctl:  # otherwise the closed task pipe still ends the worker
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _worker_main() -> None:
    """A worker process's entry point (argv: task pipe fd, result pipe fd, the parent's pid)."""
    task_fd, result_fd, parent = (int(arg) for arg in sys.argv[1:4])
    _worker(Connection(task_fd, writable=False), Connection(result_fd, readable=False), parent)


def _worker(tasks: Connection, results: Connection, parent: int) -> None:
    """A worker's life: rebuild the Encoder from the first message, then encode each batch sent, in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def read() -> None:
        while True:
            try:
                message = tasks.recv_bytes()
            except (EOFError, OSError):  # the parent closed the pipe or died: stop at once
                os._exit(0)
            inbox.put(message or None)
            if not message:  # the parent's end-of-stream
                return

    threading.Thread(target=read, daemon=True).start()
    failed = None
    try:
        from sftlab.data.encode import Encoder

        encoder = Encoder.from_recipe(pickle.loads(inbox.get() or b""))
    except BaseException as exc:  # the answer to every batch: the parent raises it
        failed = _failure(exc)
    while (message := inbox.get()) is not None:
        if failed is not None:
            results.send_bytes(failed)
            continue
        try:
            batch, keep_segments = pickle.loads(message)
            reply = pickle.dumps(("ok", [_pack(r, keep_segments, encoder.template.end_of_turn)
                                         for r in encoder.encode_batch(batch)]),
                                 protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:  # a template's TemplateError, a bug: the parent raises it
            reply = _failure(exc)
        results.send_bytes(reply)
    results.close()


def _failure(exc: BaseException) -> bytes:
    text = "".join(traceback.format_exception(exc))
    try:
        return pickle.dumps(("error", exc, text), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # an exception that does not pickle: its text
        return pickle.dumps(("error", None, text), protocol=pickle.HIGHEST_PROTOCOL)


def _pack(result: Any, keep_segments: bool, end_of_turn: Sequence[str]) -> tuple[Any, ...]:
    """A result as it crosses the pipe: a DataError / Dropped as its fields (their constructors take keyword
    arguments pickle does not pass); an Encoded's arrays in their smallest exact dtypes, and its segments (only
    while the parent's quality report reads them) as `_light_segments`."""
    if isinstance(result, DataError):
        return ("error", type(result).__name__, result.detail, result.where, result.reason)
    segments = _light_segments(result.segments, max(map(len, end_of_turn), default=0)) if keep_segments else []
    return ("ok", result.where, result.role_codes.astype(np.int8), result.truncated, segments,
            result.ids.astype(np.int32), result.trained, result.special_tokens_in_content)


def _light_segments(segments: Sequence[Segment], tail: int) -> list[tuple[str, bool, str]]:
    """What the quality report reads of a row's segments (data/quality.py: runs of trained segments of one
    role; the end of a trained run's text, to find its end-of-turn marker), as a few plain tuples: each run
    of trained segments of one role as one, holding the last `tail` characters of its text, and each stretch
    of untrained segments as one empty placeholder (it still separates the trained runs around it)."""
    light: list[tuple[str, bool, str]] = []
    for (role, trained), run in groupby(segments, key=lambda s: (s.role if s.trainable else "", s.trainable)):
        light.append(("".join(s.text for s in run)[-tail:] if trained and tail else "", trained, role))
    return light


def _unpack(result: tuple[Any, ...]) -> Any:
    from sftlab.data.encode import Dropped, Encoded

    if result[0] == "error":
        _, kind, detail, where, reason = result
        return (Dropped if kind == "Dropped" else DataError)(detail, where=where, reason=reason)
    _, where, roles, truncated, light, ids, trained, special = result
    segments = [Segment(text, flag, role) for text, flag, role in light]
    return Encoded(where, roles.astype(np.int64), truncated, segments, ids.astype(np.int64), trained, special)


def _start_process(entry: str, *, quiet: bool = False) -> tuple[subprocess.Popen[bytes], Connection, Connection]:
    """A fresh interpreter running this module's `entry` (not multiprocessing's spawn, which runs the parent's
    main script again in the child: a user's script without a __main__ guard would recurse), with a task pipe
    to it and a result pipe from it; `quiet`: its output discarded (what it has to say comes back by pipe)."""
    task_read, task_write = os.pipe()
    result_read, result_write = os.pipe()
    package_root = str(Path(__file__).resolve().parents[2])  # the directory holding sftlab/
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", f"from sftlab.data.parallel import {entry}; {entry}()",
             str(task_read), str(result_write), str(os.getpid())],
            pass_fds=(task_read, result_write), stdin=subprocess.DEVNULL, env=env, close_fds=True,
            **({"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if quiet else {}))
    except BaseException:
        for fd in (task_read, task_write, result_read, result_write):
            os.close(fd)
        raise
    os.close(task_read)  # the process's ends are its own: its death closes its pipe here
    os.close(result_write)
    return process, Connection(task_write, readable=False), Connection(result_read, writable=False)


def _validator_main() -> None:
    """The validating process's entry point (argv as a worker's): read every row with the reader sent, answer
    ("ok",) or the first bad row's error."""
    task_fd, result_fd, parent = (int(arg) for arg in sys.argv[1:4])
    tasks, results = Connection(task_fd, writable=False), Connection(result_fd, readable=False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops this process
    _die_with_parent()
    if os.getppid() != parent:
        os._exit(1)
    try:
        reader = pickle.loads(tasks.recv_bytes())
        for _ in reader():
            pass
        reply = pickle.dumps(("ok",))
    except DataError as exc:
        reply = pickle.dumps(_pack(exc, False, ()))
    except BaseException as exc:  # a bug, or the data gone: the parent raises it
        reply = _failure(exc)
    results.send_bytes(reply)
    results.close()


@dataclass(frozen=True)
class RowReader:
    """How to read a kind's rows again, as something that pickles (module-level function and plain values): the
    validation pass run by a `Validator`."""
    function: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    input_bytes: int | None
    """The input's size (None: unknown, a Hub dataset): small inputs are validated in this process."""

    def __call__(self) -> Iterable[Any]:
        return self.function(*self.args, **self.kwargs)


MIN_APART_BYTES = 16 << 20
"""The validation pass runs in a process of its own for inputs this large (starting one costs ~0.2 s of CPU)."""


class Validator:
    """The validation pass in a process of its own: with data.on_bad_row=error every row is read and checked
    before any is trusted, so that a bad row deep in a file fails at once rather than after encoding all the
    rows before it. In this process that pass took a tenth of an encoding's time on the thread that renders;
    beside it, on the core the tokenizer leaves idle, it costs none. The encoding asks `check()` after each
    batch (the reading error, once known, is raised there: the file's first bad row, as before) and `finish()`
    at the end; an error of its own waits for the verdict first, so a reading error still comes first, as when
    the whole file was validated before encoding began."""

    def __init__(self, reader: Any) -> None:
        message = pickle.dumps(reader, protocol=pickle.HIGHEST_PROTOCOL)
        # Quiet: whatever the reading warns, the encoding's own reading of the same rows warns once.
        self._process, tasks, self._results = _start_process("_validator_main", quiet=True)
        self._verdict: tuple[Any, ...] | None = None
        try:
            tasks.send_bytes(message)
        except OSError:
            pass  # it died at once: finish() says how
        finally:
            tasks.close()

    @staticmethod
    def wanted(on_bad_row: str, input_bytes: int | None, *, ranks: int = 1) -> bool:
        """Whether to validate apart: a large local input, and a core to spare per process encoding at once
        (`ranks`, see encoding_ranks). A Hub dataset is read again in this process (not over the network
        twice at once)."""
        return on_bad_row == "error" and input_bytes is not None and input_bytes >= MIN_APART_BYTES and \
            usable_cores() // max(ranks, 1) >= 2

    def check(self, *, wait: bool = False) -> None:
        """Raise the first bad row's DataError once the validating process has found it (`wait`: wait for its
        verdict)."""
        if self._verdict is None and (wait or self._results.poll()):
            try:
                self._verdict = pickle.loads(self._results.recv_bytes())
            except (EOFError, OSError):
                code = self._process.wait()
                raise WorkerError(f"the validating process exited with code {code} before its verdict "
                                  "(out of memory?)") from None
        if self._verdict is None or self._verdict[0] == "ok":
            return
        if self._verdict[0] == "error" and len(self._verdict) == 5:
            raise _unpack(self._verdict)
        _, exc, text = self._verdict
        if exc is not None:
            raise exc
        raise WorkerError(f"the validating process failed:\n{text}")

    def finish(self) -> None:
        self.check(wait=True)

    def stop(self) -> None:
        """End the process (idempotent)."""
        self._results.close()
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


class WorkerError(RuntimeError):
    """A worker process failed in a way that is not a row's DataError (it died, or sftlab has a bug)."""


class EncodePool:
    """`workers` processes encoding batches with copies of one Encoder; `encode_stream` as Encoder's, in order."""

    def __init__(self, encoder: Any, workers: int) -> None:
        try:
            recipe = pickle.dumps(encoder.recipe(), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # a tokenizer object that does not pickle
            raise ConfigError(f"data.num_workers={workers}: the tokenizer or template cannot be sent to worker "
                              f"processes ({type(exc).__name__}: {exc}); set data.num_workers=1.") from None
        self._processes: list[subprocess.Popen[bytes]] = []
        self._tasks: list[Connection] = []
        self._results: list[Connection] = []
        try:
            for _ in range(workers):
                self._start()
            for worker in range(workers):  # all started first: they boot in parallel
                self._send(worker, recipe)
        except BaseException:
            self.terminate()
            raise

    def _start(self) -> None:
        process, tasks, results = _start_process("_worker_main")
        self._processes.append(process)
        self._tasks.append(tasks)
        self._results.append(results)

    @property
    def workers(self) -> int:
        return len(self._processes)

    def encode_stream(self, batches: Iterable[Sequence[Any]], keep_segments: Any = lambda: True
                      ) -> Iterator[tuple[Sequence[Any], list[Any]]]:
        """Each batch with its results, in input order; `keep_segments()` says, as a batch is sent, whether its
        results need their segments. Closing the stream early terminates the workers."""
        pending: deque[tuple[Sequence[Any], int]] = deque()
        sent = 0
        finished = False
        try:
            for batch in batches:
                if len(pending) >= IN_FLIGHT * self.workers:
                    yield self._receive(*pending.popleft())
                worker = sent % self.workers
                self._send(worker, pickle.dumps((list(batch), bool(keep_segments())), protocol=pickle.HIGHEST_PROTOCOL))
                pending.append((batch, worker))
                sent += 1
            while pending:
                yield self._receive(*pending.popleft())
            finished = True
        finally:
            if finished:
                self.close()
            else:
                self.terminate()

    def _send(self, worker: int, message: bytes) -> None:
        try:
            self._tasks[worker].send_bytes(message)
        except OSError:  # BrokenPipeError: the worker is gone
            raise self._died(worker) from None

    def _receive(self, batch: Sequence[Any], worker: int) -> tuple[Sequence[Any], list[Any]]:
        try:
            reply = pickle.loads(self._results[worker].recv_bytes())
        except (EOFError, OSError):
            raise self._died(worker) from None
        if reply[0] == "error":
            _, exc, text = reply
            if exc is not None:
                raise exc
            raise WorkerError(f"an encoding worker failed:\n{text}")
        return batch, [_unpack(r) for r in reply[1]]

    def _died(self, worker: int) -> WorkerError:
        process = self._processes[worker]
        try:
            code = process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return WorkerError(f"an encoding worker process {how} (out of memory?); set data.num_workers=1 to "
                           "encode in one process.")

    def close(self) -> None:
        """End of stream: each worker finishes and exits."""
        for tasks in self._tasks:
            with contextlib.suppress(OSError):
                tasks.send_bytes(b"")
        for process in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        self.terminate()

    def terminate(self) -> None:
        """Stop every worker now (idempotent)."""
        for connection in self._tasks + self._results:
            connection.close()
        self._tasks, self._results = [], []
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
