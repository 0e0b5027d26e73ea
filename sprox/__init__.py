"""Sprox: a drop-in S3 caching proxy.

Embedding:

    from sprox import Sprox, run_in_thread

    async with Sprox(origin_dir="/data", port=0) as sprox:
        ...  # point S3 clients at sprox.endpoint

    with run_in_thread(origin_dir="/data") as sprox:
        ...  # same, from synchronous code
"""

from ._version import __version__
from .config import Config, ConfigError
from .server import Sprox, run_in_thread

__all__ = ["Config", "ConfigError", "Sprox", "__version__", "run_in_thread"]
