"""SIGINT / SIGTERM become a request to stop at the next step boundary, with a checkpoint.

``install()`` replaces the two handlers (main thread only; idempotent) with one that records the signal;
loops poll ``requested()`` between steps, save, and raise :class:`Interrupted`. ``distill train`` then exits
with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM), the shell convention for a signal-terminated
program, so schedulers and scripts still see that the run did not finish, while its progress is on disk.

A second signal more than ``FORCE_AFTER_S`` after the first raises ``KeyboardInterrupt`` at once (stop
without saving). Signals closer together count as one: Ctrl-C under ``torchrun`` reaches each worker
twice, from the terminal and forwarded by the launcher. ``torchrun`` SIGKILLs workers 30 s after
forwarding a signal, which a step boundary plus a checkpoint must fit into.
"""
from __future__ import annotations

import signal
import sys
import threading
import time

FORCE_AFTER_S = 1.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state: dict = {"signum": 0, "at": 0.0, "previous": None}


class Interrupted(Exception):
    """Raised after the interrupted work was saved; ``signum`` is the signal that asked for it."""

    def __init__(self, signum: int, where: str = ""):
        self.signum, self.where = signum, where
        super().__init__(f"stopped by {signal.Signals(signum).name}{': ' + where if where else ''}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum, frame) -> None:
    now = time.monotonic()
    if _state["signum"]:
        if now - _state["at"] > FORCE_AFTER_S:
            raise KeyboardInterrupt
        return
    _state["signum"], _state["at"] = signum, now
    print(f"\n{signal.Signals(signum).name} received: saving a checkpoint at the end of this step "
          f"(signal again to stop without saving)", file=sys.stderr, flush=True)


def install() -> bool:
    """Install the handlers (no-op outside the main thread or when installed); True if this call installed them."""
    if _state["previous"] is not None or threading.current_thread() is not threading.main_thread():
        return False
    _state["previous"] = {sig: signal.signal(sig, _handler) for sig in _SIGNALS}
    _state["signum"] = 0
    return True


def uninstall() -> None:
    """Restore the handlers that ``install`` replaced and forget any request."""
    previous = _state["previous"]
    if previous is not None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _state.update(signum=0, previous=None)


def requested() -> int:
    """The signal number that asked this process to stop, or 0."""
    return _state["signum"]
