"""A progress display for long command-line work (`sprox cache warm`, `sprox cache verify`).

On a terminal it is one line, redrawn in place with a carriage return at most every
`redraw` seconds; anywhere else (a pipe, a log file, CI) it writes plain lines, one
every `interval` seconds and one at the end, so a log shows progress without control
characters. Counts are absolute (`update(done=..., done_bytes=...)`), so a caller that
reports the same state twice draws it once. Nothing here starts a thread or a task: a
caller whose work can stall (a slow network read) calls `tick()` now and then so the
rate and ETA keep moving."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_BAR = 20


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """65 -> '1:05', 3723 -> '1:02:03'."""
    seconds = max(0, int(seconds + 0.5))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Progress of `total` items (and optionally `total_bytes` bytes) of work.

    `label` starts every line; `unit` names the items ("objects", "blocks"). Totals may
    be unknown (None) at first and set later with `set_total`. The rate and ETA are
    over bytes when bytes are counted, else over items, averaged since `start()`."""

    def __init__(self, label: str, unit: str, *, stream: TextIO | None = None, tty: bool | None = None,
                 interval: float = 2.0, redraw: float = 0.1, width: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self.interval = interval
        self.redraw = redraw
        self.width = width
        self.clock = clock
        self.total: int | None = None
        self.total_bytes: int | None = None
        self.done = 0
        self.done_bytes = 0
        self.note = ""
        self.started: float | None = None
        self._drawn_at: float | None = None
        self._drawn = ""  # the text last drawn, so an unchanged state is not redrawn
        self._bar_visible = False
        self._closing = False
        self.closed = False

    # -- what the caller reports ---------------------------------------------------------

    def start(self, total: int | None = None, total_bytes: int | None = None, note: str = "") -> None:
        """Start the clock and draw the first line."""
        self.started = self.clock()
        self.set_total(total, total_bytes)
        self.note = note
        self._draw(force=True)

    def set_total(self, total: int | None, total_bytes: int | None = None) -> None:
        self.total, self.total_bytes = total, total_bytes

    def update(self, done: int | None = None, done_bytes: int | None = None, note: str | None = None) -> None:
        if done is not None:
            self.done = done
        if done_bytes is not None:
            self.done_bytes = done_bytes
        if note is not None:
            self.note = note
        self._draw()

    def tick(self) -> None:
        """Redraw if it is time to (rate and ETA move even when the counts do not)."""
        self._draw()

    def message(self, text: str) -> None:
        """A line of its own (an error, a notice), kept above the bar on a terminal."""
        if self.tty and self._bar_visible:
            self.stream.write("\r\x1b[K")
            self._bar_visible = False
        self.stream.write(text + "\n")
        if self.tty and self._drawn and not self.closed:
            self._write_bar(self._drawn)
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state (always) and end the bar's line on a terminal."""
        if self.closed or self.started is None:
            self.closed = True  # never started: nothing to finish
            return
        self._closing = True  # the last line: no ETA
        self._draw(force=True, repeat=False)
        if self.tty and self._bar_visible:
            self.stream.write("\n")
            self._bar_visible = False
        self.stream.flush()
        self.closed = True

    # -- drawing -----------------------------------------------------------------------

    def elapsed(self) -> float:
        return 0.0 if self.started is None else max(0.0, self.clock() - self.started)

    def rate(self) -> float | None:
        """Bytes (or items) per second since start; None before there is any."""
        elapsed = self.elapsed()
        amount = self.done_bytes if self.total_bytes is not None else self.done
        return amount / elapsed if elapsed > 0 and amount > 0 else None

    def eta(self) -> float | None:
        rate = self.rate()
        if rate is None:
            return None
        if self.total_bytes is not None:
            return max(0, self.total_bytes - self.done_bytes) / rate
        if self.total is not None:
            return max(0, self.total - self.done) / rate
        return None

    def fraction(self) -> float | None:
        if self.total_bytes:
            return min(1.0, self.done_bytes / self.total_bytes)
        if self.total:
            return min(1.0, self.done / self.total)
        if self.total == 0 or self.total_bytes == 0:
            return 1.0
        return None

    def text(self) -> str:
        """The state in words, without the bar: what both display modes show."""
        if self.total is None and not self.done and self.note:
            return self.note  # nothing counted yet ("listing", "reading the index")
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        parts = [f"{count} {self.unit}"]
        if self.total_bytes is not None:
            parts.append(f"{format_bytes(self.done_bytes)}/{format_bytes(self.total_bytes)}")
        rate = self.rate()
        if rate is not None:
            per = f"{format_bytes(rate)}/s" if self.total_bytes is not None else f"{rate:.0f} {self.unit}/s"
            parts.append(per)
        eta = self.eta()
        if eta is not None and not self._closing and self.fraction() != 1.0:
            parts.append(f"ETA {format_duration(eta)}")
        if self.note:
            parts.append(self.note)
        return ", ".join(parts)

    def _draw(self, force: bool = False, repeat: bool = True) -> None:
        if self.closed:
            return
        now = self.clock()
        if not force and self._drawn_at is not None and now - self._drawn_at < (
                self.redraw if self.tty else self.interval):
            return
        if self.tty:
            fraction = self.fraction()
            filled = 0 if fraction is None else int(fraction * _BAR)
            bar = "#" * filled + "-" * (_BAR - filled)
            percent = "" if fraction is None else f" {fraction:4.0%}"
            line = f"{self.label} [{bar}]{percent} {self.text()}"
            if line == self._drawn and not (force and repeat):
                self._drawn_at = now
                return
            self._write_bar(line)
        else:
            line = f"{self.label}: {self.text()}"
            if line == self._drawn and not (force and repeat):
                self._drawn_at = now  # nothing new to say: say nothing
                return
            self.stream.write(line + "\n")
        self._drawn = line
        self._drawn_at = now
        self.stream.flush()

    def _write_bar(self, line: str) -> None:
        width = self.width if self.width is not None else shutil.get_terminal_size((80, 24)).columns
        if width > 1 and len(line) > width - 1:
            line = line[:width - 1]  # a wrapped line could not be redrawn in place
        self.stream.write("\r" + line + "\x1b[K")
        self._bar_visible = True
