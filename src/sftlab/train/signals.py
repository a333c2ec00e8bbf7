"""SIGINT / SIGTERM during training: finish the step, save a checkpoint, stop with a message saying how to
resume. A second signal stops at once (the checkpoint written before it is kept) — unless it comes within
REPEAT_AFTER_S of the first: a scheduler may signal every process of a job while a launcher (torchrun)
forwards the same signal to its workers, so a worker can get it twice at once; that is one request."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Self

from sftlab.errors import SftlabError

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_AFTER_S = 1.0
"""A signal this soon after the first is the same request delivered twice, not a request to stop at once."""


class TrainingInterrupted(SftlabError):
    """The run stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal's number."""

    def __init__(self, message: str, *, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopRequest:
    """While active (a `with` block in the main thread), the first SIGINT/SIGTERM only sets `signum`; the
    loop checks it after each step. Elsewhere (a worker thread) it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first = signum, now
            print(f"\n{signal.Signals(signum).name}: stopping after this step, once a checkpoint is saved "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)
            return
        if now - self._first < REPEAT_AFTER_S:
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.__exit__()
        if callable(previous):
            previous(signum, frame)  # Python's SIGINT handler: KeyboardInterrupt
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
