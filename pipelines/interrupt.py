"""Ctrl-C (SIGINT) and SIGTERM: stop cleanly, keep what was done, say how to go on.

Outside training, either signal raises `Interrupted` (a KeyboardInterrupt): the stage's run ends KILLED and
the CLI prints one line and exits 128 + the signal number. While training, `GracefulStop` turns the first
signal into a request (stop before the next step with a checkpoint, then one line on how to resume); a
second one stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class Interrupted(KeyboardInterrupt):
    """The command was stopped by a signal; the message says what was kept and how to go on."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def raise_interrupted(signum, frame) -> None:  # noqa: ARG001 - a signal handler's signature
    raise Interrupted(f"stopped by {signal_name(signum)}", signum)


def install_default_handlers() -> None:
    """SIGTERM behaves like Ctrl-C (an exception in the main thread: runs end KILLED, files stay whole)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_interrupted)


class GracefulStop:
    """The first SIGINT/SIGTERM sets `requested` (its number) and runs the `on_request` callbacks, a second one
    raises Interrupted; outside the main thread (where Python delivers signals) it changes nothing."""

    def __init__(self, what: str = "training"):
        self.what = what
        self.requested: int | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._previous: dict[int, object] = {}

    def on_request(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)
        if self.requested is not None:
            callback()

    def __call__(self) -> bool:
        return self.requested is not None

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested is not None:
            raise Interrupted(f"stopped at once by a second {signal_name(signum)}; the last periodic checkpoint is "
                              "kept: run the same command again to resume from it", signum)
        self.requested = signum
        log.warning("%s: stopping %s after the current step and saving a checkpoint (%s again stops at once)",
                    signal_name(signum), self.what, signal_name(signum))
        for callback in self._callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - the stop itself must go on
                log.debug("stop callback failed", exc_info=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
