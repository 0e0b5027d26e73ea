"""Test guards shared by suites that drive async code in-process."""

from __future__ import annotations

import asyncio
import builtins
import os

import pytest

# File-system calls that block: none may run on an event loop's thread.
BLOCKING_CALLS = [(os, "open"), (os, "stat"), (os, "lstat"), (os, "scandir"), (os, "listdir"),
                  (os, "rename"), (os, "replace"), (os, "unlink"), (os, "mkdir"), (os, "rmdir"),
                  (os, "makedirs"), (os, "pread"), (os, "fsync"), (builtins, "open")]


@pytest.fixture(autouse=True)
def no_blocking_on_loop(monkeypatch):
    """File-system calls made while an event loop runs in this thread fail the test.
    Import it into a test module to apply it there."""

    def guard(name, function):
        def guarded(*args, **kwargs):
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return function(*args, **kwargs)
            raise AssertionError(f"blocking os call {name}{args[:1]} on the event loop")
        return guarded

    for module, name in BLOCKING_CALLS:
        monkeypatch.setattr(module, name, guard(name, getattr(module, name)))
