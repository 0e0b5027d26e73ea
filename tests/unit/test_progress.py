"""sprox.progress: the bar on a terminal, plain lines elsewhere, throttled either way."""

from __future__ import annotations

import io

import pytest

from sprox.progress import Progress, format_bytes, format_duration


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(tty: bool, **kw) -> tuple[Progress, FakeStream, FakeClock]:
    stream, clock = FakeStream(tty), FakeClock()
    return Progress("warm", "objects", stream=stream, clock=clock, width=200, **kw), stream, clock


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                         (5 * 2**20, "5.0 MiB"), (3 * 2**40, "3.0 TiB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize(("seconds", "text"), [(0, "0:00"), (5.4, "0:05"), (65, "1:05"), (3723, "1:02:03")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_tty_is_detected_from_the_stream():
    assert Progress("x", "items", stream=FakeStream(True)).tty is True
    assert Progress("x", "items", stream=FakeStream(False)).tty is False
    assert Progress("x", "items", stream=io.StringIO()).tty is False  # StringIO.isatty() is False


def test_plain_lines_every_interval_and_one_at_the_end():
    progress, stream, clock = make(tty=False)
    progress.start(total=4, total_bytes=4000, note="")
    for i in range(1, 4):
        clock.now += 0.5  # updates more often than the interval draw nothing
        progress.update(done=i, done_bytes=i * 1000)
    clock.now += 1.0  # 2.5 s since the first line
    progress.tick()
    clock.now += 1.0
    progress.update(done=4, done_bytes=4000)  # only 1 s later: not drawn...
    progress.close()  # ...but the end always is
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert lines == [
        "warm: 0/4 objects, 0 B/3.9 KiB",
        "warm: 3/4 objects, 2.9 KiB/3.9 KiB, 1.2 KiB/s, ETA 0:01",
        "warm: 4/4 objects, 3.9 KiB/3.9 KiB, 1.1 KiB/s",  # no ETA on the last line
    ]


def test_plain_mode_does_not_repeat_an_unchanged_line_at_close():
    progress, stream, _ = make(tty=False)
    progress.start(note="listing")
    progress.close()
    assert stream.getvalue() == "warm: listing\n"


def test_tty_redraws_in_place_throttled_and_ends_the_line():
    progress, stream, clock = make(tty=True, redraw=0.1)
    progress.start(total=10, note="")
    progress.update(done=1)  # same instant: throttled
    clock.now += 0.2
    progress.update(done=5)
    clock.now += 0.05
    progress.update(done=6)  # throttled
    progress.close()
    out = stream.getvalue()
    frames = out.split("\r")[1:]
    assert len(frames) == 3, frames
    assert frames[0] == "warm [--------------------]   0% 0/10 objects\x1b[K"
    assert frames[1].startswith("warm [##########----------]  50% 5/10 objects, 25 objects/s, ETA 0:00")
    assert frames[2].startswith("warm [############--------]  60% 6/10 objects, 24 objects/s\x1b[K")
    assert out.endswith("\x1b[K\n") and out.count("\n") == 1  # one line, ended once


def test_tty_line_is_cut_to_the_terminal_width():
    stream, clock = FakeStream(True), FakeClock()
    progress = Progress("warm", "objects", stream=stream, clock=clock, width=30)
    progress.start(total=1000, total_bytes=10**9)
    frame = stream.getvalue().split("\r")[-1]
    assert frame.endswith("\x1b[K") and len(frame.removesuffix("\x1b[K")) == 29


def test_tty_message_goes_above_the_bar_and_the_bar_comes_back():
    progress, stream, _ = make(tty=True)
    progress.start(total=2)
    progress.message("sprox: warm: s3://b/k: HTTP 403 AccessDenied")
    out = stream.getvalue()
    bar = "warm [--------------------]   0% 0/2 objects"
    assert out == f"\r{bar}\x1b[K\r\x1b[Ksprox: warm: s3://b/k: HTTP 403 AccessDenied\n\r{bar}\x1b[K"


def test_plain_message_is_a_line():
    progress, stream, _ = make(tty=False)
    progress.start(total=2)
    progress.message("oops")
    assert stream.getvalue() == "warm: 0/2 objects\noops\n"


def test_unknown_total_counts_without_a_fraction_or_eta():
    progress, stream, clock = make(tty=True)
    progress.start()
    clock.now += 1
    progress.update(done=7)
    progress.close()
    assert "[--------------------] 7 objects, 7 objects/s\x1b[K\n" in stream.getvalue()
    assert "ETA" not in stream.getvalue()


def test_nothing_is_drawn_after_close():
    progress, stream, clock = make(tty=False)
    progress.start(total=1)
    progress.close()
    before = stream.getvalue()
    clock.now += 10
    progress.update(done=1)
    progress.tick()
    progress.close()
    assert stream.getvalue() == before
