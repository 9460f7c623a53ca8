"""Progress for long work, and how much Keras's fit prints.

On a terminal a keras Progbar redraws itself; elsewhere (a log file, CI, a captured
notebook) progress is one log line every few seconds with the rate and the time left,
instead of thousands of redraw fragments. Progress is hidden when the 'tlapp' logger is set
above INFO (`tlapp -q`).
"""
from __future__ import annotations

import logging
import sys
import time

NON_TERMINAL_INTERVAL_S = 10.0
log = logging.getLogger("tlapp")


def is_terminal() -> bool:
    return hasattr(sys.stdout, "isatty") and sys.stdout.isatty()


def enabled() -> bool:
    """True unless the 'tlapp' logger was set to WARNING or quieter."""
    level = log.level
    return level == logging.NOTSET or level <= logging.INFO


def fit_verbosity() -> int:
    """`model.fit(verbose=...)`: a live bar on a terminal, one line per epoch elsewhere,
    nothing when progress is hidden."""
    if not enabled():
        return 0
    return 1 if is_terminal() else 2


class Progress:
    """Counts `total` items of `unit` ("file", "image"); `update(done)` as work finishes.

    Args:
        label: the prefix of non-terminal lines, e.g. "scan".
    """

    def __init__(self, total: int, unit: str, label: str):
        self.total, self.unit, self.label = total, unit, label
        self.start = self.last = time.perf_counter()
        self.bar = None
        self.active = enabled() and total > 0
        if self.active and is_terminal():
            from keras.utils import Progbar

            self.bar = Progbar(total, unit_name=unit, stateful_metrics=[f"{unit}s/s"])

    def update(self, done: int) -> None:
        if not self.active:
            return
        now = time.perf_counter()
        rate = done / max(now - self.start, 1e-9)
        if self.bar is not None:
            if now - self.last >= 0.1 or done >= self.total:
                self.bar.update(done, [(f"{self.unit}s/s", rate)])
                self.last = now
        elif now - self.last >= NON_TERMINAL_INTERVAL_S or done >= self.total:
            left = (self.total - done) / rate if rate > 0 else 0
            eta = f", {_duration(left)} left" if done < self.total else \
                f" in {_duration(now - self.start)}"
            log.info("%s: %s/%s %ss, %s/s%s", self.label, f"{done:,}", f"{self.total:,}",
                     self.unit, f"{rate:,.0f} {self.unit}s", eta)
            self.last = now
        if done >= self.total:
            self.active = False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds}s"
