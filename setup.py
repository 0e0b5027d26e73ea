"""Declares Sprox's compiled extension modules; everything else is in pyproject.toml.

Build switches (environment variables):
  SPROX_NO_EXTENSIONS=1  build no extension (the pure-Python twins are used)
  SPROX_DEBUG=1          line tracing and C asserts, for profiling and debugging

The io_uring module (`uring`) is built only where liburing is installed (found with
pkg-config, else by its header); without it the rest still builds and Sprox uses the
thread-pool twin. Likewise the signature check (`fastsig`) and the hit kernel (`kernel`) need OpenSSL's
libcrypto. Where no extension can be compiled at all (no C compiler, an
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
CRYPTO_MODULES = ["fastsig", "kernel"]  # need libcrypto
LIBURING_HEADER = "/usr/include/liburing.h"
OPENSSL_HEADER = "/usr/include/openssl/evp.h"


def _pkg_config(package: str, library: str, header: str):
    """Extension arguments for linking `package` (pkg-config, else its `header` in
    /usr/include and -l`library`), or None when it is not installed."""
    try:
        found = subprocess.run(
            ["pkg-config", "--cflags", "--libs", package],
            capture_output=True, text=True, check=False,
        )
    except OSError:  # no pkg-config
        found = None
    if found is not None and found.returncode == 0:
        flags = shlex.split(found.stdout)
        return {
            "include_dirs": [f[2:] for f in flags if f.startswith("-I")],
            "library_dirs": [f[2:] for f in flags if f.startswith("-L")],
            "libraries": [f[2:] for f in flags if f.startswith("-l")] or [library],
        }
    if os.path.exists(header):
        return {"libraries": [library]}
    return None


def liburing():
    """Extension arguments for linking liburing, or None when it is not installed."""
    return _pkg_config("liburing", "uring", LIBURING_HEADER)


def libcrypto():
    """Extension arguments for linking OpenSSL's libcrypto, or None without it."""
    return _pkg_config("libcrypto", "crypto", OPENSSL_HEADER)


def extensions():
    if os.environ.get("SPROX_NO_EXTENSIONS") == "1":
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    debug = os.environ.get("SPROX_DEBUG") == "1"
    macros = [("CYTHON_TRACE_NOGIL", "1")] if debug else [("NDEBUG", "1")]
    # name -> extra Extension arguments (libraries to link)
    modules = {name: {} for name in NATIVE_MODULES}
    crypto = libcrypto()
    if crypto is None:
        print(
            "setup.py: OpenSSL's libcrypto not found (pkg-config libcrypto, or "
            f"{OPENSSL_HEADER}): skipping sprox._native.fastsig and sprox._native.kernel; fastsig's pure-Python twin "
            "checks signatures, and the Python lane answers every cache hit (Debian: libssl-dev)",
            file=sys.stderr,
        )
    else:
        modules.update((name, crypto) for name in CRYPTO_MODULES)
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
