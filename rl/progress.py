"""Progress that reads well where it goes: a tqdm bar on a terminal; in a log file (CI, nohup,
a pipe) one line when the loop starts, at most one line per 30 s or per 10 % of the loop, and one at
the end, each with the loop's key numbers (`set_postfix`), instead of thousands of bar redraws."""

from __future__ import annotations

import sys
import time


class LineProgress:
    """The log-file form of a progress bar: `update`, `set_postfix`, `write`, `close` like tqdm's."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every_s: float = 30.0, stream=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every_s, self.stream = every_s, stream or sys.stderr
        self.postfix: dict = {}
        self.started = self._last = time.monotonic()
        self._last_tenth = self._tenth()
        self._print(f"{desc}: {initial}/{total} {unit}s")

    def _tenth(self) -> int:
        return (10 * self.n) // max(1, self.total)

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
        self._printed_n = self.n

    def _line(self) -> str:
        rate = (self.n / (time.monotonic() - self.started)) if time.monotonic() > self.started else 0.0
        fields = ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        return f"{self.desc}: {self.n}/{self.total} {self.unit}s ({rate:.2f}/s){'; ' + fields if fields else ''}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_s or self._tenth() > self._last_tenth:
            self._print(self._line())
            self._last, self._last_tenth = now, self._tenth()

    def set_postfix(self, **fields) -> None:
        self.postfix = fields

    def write(self, line: str) -> None:
        self._print(line)

    def close(self) -> None:
        """The last numbers, unless the last line already showed them."""
        if self._printed_n != self.n:
            self._print(self._line())


def progress_bar(total: int, desc: str, unit: str, initial: int = 0):
    """tqdm on a terminal, LineProgress otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return LineProgress(total, desc, unit, initial)
