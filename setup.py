"""Declares Sprox's compiled extension modules; everything else is in pyproject.toml.

Build switches (environment variables):
  SPROX_NO_EXTENSIONS=1  build no extension (the pure-Python twins are used)
  SPROX_DEBUG=1          line tracing and C asserts, for profiling and debugging
"""

import os

from setuptools import setup

NATIVE_MODULES = ["ranges"]


def extensions():
    if os.environ.get("SPROX_NO_EXTENSIONS") == "1":
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    debug = os.environ.get("SPROX_DEBUG") == "1"
    macros = [("CYTHON_TRACE_NOGIL", "1")] if debug else [("NDEBUG", "1")]
    modules = [
        Extension(
            f"sprox._native.{name}",
            [f"sprox/_native/{name}.pyx"],
            define_macros=macros,
            extra_compile_args=["-O2"] if not debug else ["-O0", "-g"],
        )
        for name in NATIVE_MODULES
    ]
    return cythonize(
        modules,
        # The one place Cython directives are declared.
        compiler_directives={
            "language_level": "3",
            "embedsignature": True,
            "linetrace": debug,
        },
    )


setup(ext_modules=extensions())
