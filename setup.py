"""Builds the Cython extensions in cext/ (which mirrors the package path) into the grozd package,
and compiles the modules on a store request's path (plain Python, unchanged) the same way."""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
DEBUG = os.environ.get("GROZD_DEBUG_BUILD") == "1"

# Every request to a member runs these once (HTTP, the keys API, the store): compiled, they skip
# the interpreter's dispatch and frames (~10% of a leader's CPU per write). The .py stays the
# source and runs as it is wherever the compiled module is missing (the debug build leaves them
# out). Annotations are not used as C types, so the compiled module behaves exactly as the .py.
# The Raft member's modules (node, transport, wal) stay interpreted: their per-batch code is
# mostly attribute access, which the interpreter caches and compiled code looks up every time
# (compiled, a single client's writes were 7% slower).
REQUEST_PATH = [
    "src/grozd/http/server.py",
    "src/grozd/api/forms.py",
    "src/grozd/api/handlers.py",
    "src/grozd/store/commands.py",
    "src/grozd/store/event.py",
    "src/grozd/store/gojson.py",
    "src/grozd/store/store.py",
    "src/grozd/store/watch.py",
]


def extension(source: Path, module_parts: tuple[str, ...]) -> Extension:
    return Extension(
        ".".join(module_parts),
        [str(source.relative_to(HERE))],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O2"],
        define_macros=[("CYTHON_TRACE", "1")] if DEBUG else [],
    )


def native() -> list[Extension]:
    exts = []
    for pyx in sorted((HERE / "cext").rglob("*.pyx")):
        exts.append(extension(pyx, pyx.relative_to(HERE / "cext").with_suffix("").parts))
    return exts


def request_path() -> list[Extension]:
    return [extension(HERE / p, Path(p).relative_to("src").with_suffix("").parts)
            for p in REQUEST_PATH]


directives = {"language_level": "3", "embedsignature": True}
if DEBUG:
    directives.update(boundscheck=True, wraparound=True, linetrace=True, profile=True)
else:
    # Bounds checks and negative indices stay on: a wrong index must raise, never corrupt memory.
    directives.update(cdivision=True)

ext_modules = cythonize(
    native(),
    include_path=["cext"],
    compiler_directives=directives,
    annotate=DEBUG,
    # Debug C sources go elsewhere so they never stand in for the optimised ones.
    build_dir="build/debug/c" if DEBUG else None,
    force=DEBUG,
)
if not DEBUG:
    ext_modules += cythonize(
        request_path(),
        compiler_directives={"language_level": "3", "annotation_typing": False,
                             "binding": True},
    )

setup(ext_modules=ext_modules)
