"""Which connection lane Sprox loads: the compiled one in a normal build (a silent
fall-back to Python would cost every cache hit), the twin with SPROX_NO_EXTENSIONS=1.
The lanes' behaviour is tested end to end, on both, in tests/functional/test_lane.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sprox.lane

REPO_ROOT = Path(__file__).resolve().parents[2]
NO_EXTENSIONS = os.environ.get("SPROX_NO_EXTENSIONS") == "1"


def test_normal_build_uses_the_compiled_lane() -> None:
    if NO_EXTENSIONS:
        assert sprox.lane.NATIVE is False
        return
    assert sprox.lane.NATIVE is True
    assert sprox.lane.LaneServer.__module__ == "sprox._native.lane"
    # Compiled, not a .py that happens to be called lane: Cython functions are not
    # Python functions.
    assert type(sprox.lane.LaneServer.date_header).__name__ != "function"


def test_no_extensions_env_selects_the_twin() -> None:
    program = "import sprox.lane as l; print(l.NATIVE, l.LaneServer.__module__)"
    completed = subprocess.run([sys.executable, "-c", program], cwd=REPO_ROOT,
                               env={**os.environ, "SPROX_NO_EXTENSIONS": "1"},
                               capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["False", "sprox._native._lane_py"]
