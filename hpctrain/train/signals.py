"""StopFlag: a signal sets it, the trainer reads it at step boundaries.

The handler only records the signal; the trainer, at the next step boundary, combines
the flag across ranks, saves ``last.pt`` and returns ``preempted``. Nothing heavy runs
inside the handler, so a signal arriving mid-step cannot leave a half-written file.
"""
from __future__ import annotations

import signal
from typing import Iterable, Optional

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name: Optional[str] = None
        self._previous: dict[int, object] = {}

    def request(self, reason: str = "request") -> None:
        """Ask the trainer to stop at the next step boundary (also what the handler does)."""
        self.signal_name = self.signal_name or reason
        self.requested = True

    def _handle(self, signum, _frame) -> None:
        self.request(signal.Signals(signum).name)

    def install(self, signals: Iterable[int] = DEFAULT_SIGNALS) -> "StopFlag":
        """Install the handler for ``signals`` (main thread only); returns self."""
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
