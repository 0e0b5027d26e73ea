"""Declares Sprox's compiled extension modules; everything else is in pyproject.toml.

Build switches (environment variables):
  SPROX_NO_EXTENSIONS=1  build no extension (the pure-Python twins are used)
  SPROX_DEBUG=1          line tracing and C asserts, for profiling and debugging

The io_uring module (`uring`) is built only where liburing is installed (found with
pkg-config, else by its header); without it the rest still builds and Sprox uses the
thread-pool twin. Where no extension can be compiled at all (no C compiler, an
unsupported platform), the build goes on without them and says what that costs: every
module has a pure-Python twin.
"""

import os
import shlex
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError as DistutilsError
from setuptools.errors import CCompilerError

NATIVE_MODULES = ["ranges", "lane"]
LIBURING_HEADER = "/usr/include/liburing.h"


def liburing():
    """Extension arguments for linking liburing, or None when it is not installed."""
    try:
        found = subprocess.run(
            ["pkg-config", "--cflags", "--libs", "liburing"],
            capture_output=True, text=True, check=False,
        )
    except OSError:  # no pkg-config
        found = None
    if found is not None and found.returncode == 0:
        flags = shlex.split(found.stdout)
        return {
            "include_dirs": [f[2:] for f in flags if f.startswith("-I")],
            "library_dirs": [f[2:] for f in flags if f.startswith("-L")],
            "libraries": [f[2:] for f in flags if f.startswith("-l")] or ["uring"],
        }
    if os.path.exists(LIBURING_HEADER):
        return {"libraries": ["uring"]}
    return None


def extensions():
    if os.environ.get("SPROX_NO_EXTENSIONS") == "1":
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    debug = os.environ.get("SPROX_DEBUG") == "1"
    macros = [("CYTHON_TRACE_NOGIL", "1")] if debug else [("NDEBUG", "1")]
    # name -> extra Extension arguments (libraries to link)
    modules = {name: {} for name in NATIVE_MODULES}
    uring = liburing()
    if uring is None:
        print(
            "setup.py: liburing not found (pkg-config liburing, or "
            f"{LIBURING_HEADER}): skipping sprox._native.uring; the thread-pool twin "
            "will serve --io-backend auto",
            file=sys.stderr,
        )
    else:
        modules["uring"] = uring
    return cythonize(
        [
            Extension(
                f"sprox._native.{name}",
                [f"sprox/_native/{name}.pyx"],
                define_macros=macros,
                extra_compile_args=["-O2"] if not debug else ["-O0", "-g"],
                **link,
            )
            for name, link in modules.items()
        ],
        # The one place Cython directives are declared.
        compiler_directives={
            "language_level": "3",
            "embedsignature": True,
            "linetrace": debug,
        },
    )


PURE_PYTHON_NOTE = (
    "sprox: installing the pure-Python build: {reason}. Sprox works the same, but "
    "cache hits cost more CPU (the HTTP fast lane and range arithmetic run as Python), "
    "and cache I/O uses a thread pool instead of io_uring. Install a C compiler, the "
    "Python headers and liburing (Debian: gcc python3-dev liburing-dev) for the fast build."
)


class OptionalBuildExt(build_ext):
    """build_ext that falls back to the pure-Python twins when compiling fails."""

    def run(self):
        self.failed = []
        try:
            super().run()
        except (CCompilerError, DistutilsError, OSError) as exc:
            self.failed.append(f"the build failed ({exc})")
        if self.failed:
            print("\n" + PURE_PYTHON_NOTE.format(reason="; ".join(self.failed)) + "\n", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except (CCompilerError, DistutilsError, OSError) as exc:
            self.failed.append(f"{ext.name} did not compile ({exc})")


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
