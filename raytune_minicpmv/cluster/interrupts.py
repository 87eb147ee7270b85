"""Ctrl-C (SIGINT) and SIGTERM (Kubernetes, `ray job stop`) stop a `train` / `tune` driver cleanly.

    with stop_signals() as stopped:       # SIGTERM is handled like SIGINT for the block
        result = trainer.fit()            # Ray Train / Tune run their own graceful SIGINT handling inside
    if stopped.signum: raise Interrupted(...)

Ray Train's `fit` and Ray Tune's `Tuner.fit` install their own SIGINT handlers in the main thread (Train aborts
the controller and workers; Tune stops the trials after writing its experiment state one last time). SIGTERM has
no Python handler, and the Ray driver dies of it with SIGABRT and a C stack dump. Here SIGTERM calls whatever SIGINT
handler is installed at that moment, so both signals take Ray's graceful path; checkpoints already reported stay.
`Interrupted` carries the exit code (128 + signal number) and the "rerun to resume" message to the CLI.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import Iterator, Optional


class Interrupted(Exception):
    """The driver was stopped by a signal; `exit_code` is 128 + signum (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


@dataclass
class StopState:
    signum: Optional[int] = None  # the first stop signal seen in the block

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@contextlib.contextmanager
def stop_signals() -> Iterator[StopState]:
    """Record SIGINT/SIGTERM during the block; SIGTERM runs the current SIGINT handler (Ray's, while it fits)."""
    state = StopState()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield state
        return

    def on_sigterm(signum, frame):
        state.signum = state.signum or signum
        current = signal.getsignal(signal.SIGINT)
        if callable(current) and current not in (on_sigint, signal.default_int_handler):
            current(signal.SIGINT, frame)  # Ray's graceful stop (it may raise SystemExit, see `run_train`)
        else:
            raise KeyboardInterrupt

    def on_sigint(signum, frame):  # only runs while no Ray handler is installed (setup, teardown)
        state.signum = state.signum or signum
        raise KeyboardInterrupt

    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def note_sigint(state: StopState) -> None:
    """Ray's own SIGINT handler ran (it does not tell us): record SIGINT unless SIGTERM came first."""
    state.signum = state.signum or signal.SIGINT
