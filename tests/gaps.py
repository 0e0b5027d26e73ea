"""Known gaps outside Sprox (an upstream's or a library's bug), marked on the test that
meets them."""

from __future__ import annotations

import pytest


def known_gap(request: pytest.FixtureRequest, reason: str) -> None:
    """The running test is expected to fail for `reason`. The test still runs, and the
    mark is strict: once the gap closes, its unexpected pass fails the suite, so the
    mark cannot outlive the bug (unlike pytest.xfail(), which stops the test at once)."""
    request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
