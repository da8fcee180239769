"""Progress display: a tqdm bar on a terminal, plain periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("card_jax")


class Progress:
    """Reports training progress. `mode`: auto | bar | log | none."""

    def __init__(self, total: int, initial: int, mode: str = "auto", desc: str = "train"):
        if mode not in ("auto", "bar", "log", "none"):
            raise ValueError(f"train.progress must be auto, bar, log or none; got {mode!r}")
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.total, self.desc = mode, total, desc
        self._bar = None
        self._start, self._start_step = time.monotonic(), initial
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, step: int, text: str) -> None:
        """Called every `log_every` steps with the steps done so far and a metrics summary."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(text, refresh=True)
        elif self.mode == "log":
            elapsed = time.monotonic() - self._start
            done = step - self._start_step
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            log.info("%s step %d/%d (%.0f%%) %s | %.2f steps/s, ETA %.0fs", self.desc, step,
                     self.total, 100.0 * step / self.total, text, rate, eta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
