"""Progress of a stage: a tqdm bar on a terminal, periodic log lines elsewhere."""

from __future__ import annotations

import datetime
import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class Progress:
    """Reports steps done, the latest metrics and the time left.

    Args:
        desc: what trains (``ar``, ``tokenizer``).
        total: the run's steps.
        start: steps already done (a resumed run).
        enabled: False on ranks other than 0.
        tty: draw a bar; None decides by whether stderr is a terminal.
    """

    def __init__(self, desc: str, *, total: int, start: int, enabled: bool = True, tty: bool | None = None):
        self.desc, self.total, self.start = desc, total, start
        self.enabled = enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._t0 = time.perf_counter()
        self._bar = None
        if enabled and self.tty:
            self._bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: dict | None = None) -> None:
        """Step ``step`` is done; ``metrics`` (loss, lr, images_per_s) when this step logged."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if metrics:
                self._bar.set_postfix(_short(metrics), refresh=False)
            return
        if metrics:
            done = step - self.start
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / done * (self.total - step) if done else 0.0
            parts = " ".join(f"{k} {v}" for k, v in _short(metrics).items())
            log.info(
                "%s step %d/%d %s eta %s",
                self.desc,
                step,
                self.total,
                parts,
                datetime.timedelta(seconds=round(eta)),
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _short(metrics: dict) -> dict[str, str]:
    out = {}
    for key, name, fmt in (
        ("loss", "loss", "{:.4f}"),
        ("lr", "lr", "{:.2e}"),
        ("images_per_s", "img/s", "{:.1f}"),
    ):
        value = metrics.get(key)
        if value is not None:
            out[name] = fmt.format(value)
    return out
