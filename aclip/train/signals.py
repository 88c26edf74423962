"""Stop signals: SIGUSR1 (slurm's warning before the time limit), SIGTERM (preemption, scancel,
timeout) and SIGINT (Ctrl-C) stop training at a step boundary that every rank agrees on."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

from aclip import distributed as dist_utils

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Within ``with``, a stop signal only sets :attr:`received` (the loop saves and stops at
    its next :meth:`check`); a second SIGINT interrupts at once (KeyboardInterrupt). The previous
    handlers come back afterwards. Handlers are installed from the main thread only."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._saved: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._saved = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved = {}

    def check(self, device: torch.device) -> bool:
        """Whether any rank got a stop signal (one small all-reduce, so that all ranks stop at
        the same step); the signal is recorded here on every rank."""
        flag = torch.tensor([float(self.received or 0)], device=device)
        got = int(dist_utils.all_reduce_max(flag).item())
        if got:
            self.received = got
        return bool(got)

    @property
    def name(self) -> str:
        """The received signal's name (SIGTERM when none was received)."""
        return signal.Signals(self.received or signal.SIGTERM).name
