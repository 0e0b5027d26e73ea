"""--event-loop: uvloop when it imports (auto), the standard loop on request or without it."""

from __future__ import annotations

import asyncio
import sys

import pytest

from sprox.config import Config, ConfigError
from sprox.eventloop import loop_factory


def test_auto_is_uvloop_when_installed_and_asyncio_on_request() -> None:
    uvloop = pytest.importorskip("uvloop")
    make, name = loop_factory("auto")
    assert (make, name) == (uvloop.new_event_loop, "uvloop")
    loop = make()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    make, name = loop_factory("asyncio")
    assert name == "asyncio"
    loop = make()
    try:
        assert isinstance(loop, asyncio.BaseEventLoop) and not isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_without_uvloop_auto_falls_back_and_an_explicit_choice_is_an_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert loop_factory("auto")[1] == "asyncio"
    with pytest.raises(RuntimeError, match="uvloop is not installed"):
        loop_factory("uvloop")


def test_a_bad_choice_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="--event-loop"):
        Config(origin_dir="/tmp", event_loop="tokio")
