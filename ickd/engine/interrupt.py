"""Ctrl-C (SIGINT) on a training run: stop after the current batch with a mid-epoch checkpoint.

The trainer polls :meth:`Callback.interrupt_requested` after every batch (the same path launchers use
for preemption). The first Ctrl-C only sets a flag, so the trainer saves ``checkpoints/last.pt`` at
the batch it reached and ends with ``status='interrupted'``; running the same command again resumes
from that batch. A second Ctrl-C raises :class:`KeyboardInterrupt` at once (the previous checkpoint
stays, files are written atomically). Core code: no launcher, sweep or tracker imports.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

from ickd.engine.callbacks import Callback

MESSAGE = b"\nCtrl-C: stopping after the current batch with a checkpoint (press Ctrl-C again to abort at once)\n"


class CtrlCStop(Callback):
    """Use as a context manager around ``train(...)`` and pass it in ``callbacks``."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def install(self) -> "CtrlCStop":
        # Python delivers signals to the main thread only; elsewhere (a thread running train) do nothing.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False

    def __enter__(self) -> "CtrlCStop":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second Ctrl-C: abort now
            raise KeyboardInterrupt
        self.requested = True
        try:
            os.write(2, MESSAGE)  # not logging: its locks are not safe inside a signal handler
        except OSError:
            pass

    def interrupt_requested(self) -> bool:
        return self.requested
