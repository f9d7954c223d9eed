"""Builds the Cython extensions in cext/ (which mirrors the package path) into the grozd package."""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
DEBUG = os.environ.get("GROZD_DEBUG_BUILD") == "1"


def extensions() -> list[Extension]:
    exts = []
    for pyx in sorted((HERE / "cext").rglob("*.pyx")):
        rel = pyx.relative_to(HERE)
        module = ".".join(pyx.relative_to(HERE / "cext").with_suffix("").parts)
        exts.append(
            Extension(
                module,
                [str(rel)],
                extra_compile_args=["-O0", "-g"] if DEBUG else ["-O2"],
                define_macros=[("CYTHON_TRACE", "1")] if DEBUG else [],
            )
        )
    return exts


directives = {"language_level": "3", "embedsignature": True}
if DEBUG:
    directives.update(boundscheck=True, wraparound=True, linetrace=True, profile=True)
else:
    # Bounds checks and negative indices stay on: a wrong index must raise, never corrupt memory.
    directives.update(cdivision=True)

setup(
    ext_modules=cythonize(
        extensions(),
        include_path=["cext"],
        compiler_directives=directives,
        annotate=DEBUG,
        # Debug C sources go elsewhere so they never stand in for the optimised ones.
        build_dir="build/debug/c" if DEBUG else None,
        force=DEBUG,
    ),
)
