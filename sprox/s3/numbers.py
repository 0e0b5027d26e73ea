"""Numbers in text a client or an upstream sent (header values, an answer's
Content-Range), read one way everywhere.

Only ASCII digits count: `str.isdigit()` and the regex `\\d` also accept "²" and other
scripts' digits, which `int()` then refuses (or reads), and `int()` refuses more than
4300 digits. A byte count or offset fits in 19 digits.
"""

from __future__ import annotations

import re

_DECIMAL = re.compile(r"[0-9]{1,19}")
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")


def decimal(text: str | None) -> int | None:
    """A non-negative whole number written in ASCII digits, else None."""
    if text is None or not _DECIMAL.fullmatch(text):
        return None
    return int(text)


def parse_content_range(text: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total) of `Content-Range: bytes first-last/total` (total None for
    `*`), else None."""
    match = _CONTENT_RANGE.fullmatch(text or "")
    if match is None:
        return None
    total = match.group(3)
    return int(match.group(1)), int(match.group(2)), None if total == "*" else int(total)

