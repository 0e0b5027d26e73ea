"""--event-loop: uvloop when installed (auto, the default), either loop on request."""

from __future__ import annotations

import asyncio
import sys

import pytest

from sprox.config import Config, ConfigError
from sprox.eventloop import loop_factory


def test_uvloop_by_default_and_either_loop_on_request() -> None:
    assert Config(origin_dir="/tmp").event_loop == "auto"
    make, name = loop_factory("asyncio")
    loop = make()
    try:
        assert name == "asyncio" and type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()
    uvloop = pytest.importorskip("uvloop")
    make, name = loop_factory("uvloop")
    loop = make()
    try:
        assert name == "uvloop" and isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    assert loop_factory("auto")[1] == "uvloop"


def test_auto_falls_back_to_the_standard_loop_without_uvloop(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    make, name = loop_factory("auto")
    assert name == "asyncio" and make is asyncio.new_event_loop


def test_uvloop_asked_for_but_missing_is_an_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    with pytest.raises(RuntimeError, match="uvloop is not installed"):
        loop_factory("uvloop")


def test_a_bad_choice_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="--event-loop"):
        Config(origin_dir="/tmp", event_loop="tokio")
