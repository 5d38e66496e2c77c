"""Stopping a run on request: the first Ctrl-C or SIGTERM lets the current step finish and a
checkpoint be saved; a second Ctrl-C aborts at once."""

from __future__ import annotations

import signal


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived; a checkpoint of the last completed step was saved."""


class StopRequest:
    """The first Ctrl-C or SIGTERM asks to stop after the current step; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __enter__(self) -> StopRequest:
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print("\n[ipex-lars] stopping after this step to save a checkpoint (Ctrl-C again to abort)", flush=True)
