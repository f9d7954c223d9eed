"""The guard that keeps the tests from running compiled modules older than their source."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import stale_compiled_modules


def test_a_compiled_module_older_than_its_source_is_named(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for stem in ("fresh", "sub/edited"):
        (package / f"{stem}.py").write_text("x = 1\n")
        (package / f"{stem}.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (package / "native.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")  # no .py: a .pyx's
    os.utime(package / "sub/edited.cpython-311-x86_64-linux-gnu.so", (1, 1))
    assert stale_compiled_modules(package) == ["pkg/sub/edited.py"]


def test_the_installed_package_is_not_stale() -> None:
    import grozd

    assert stale_compiled_modules(Path(grozd.__file__).parent) == []
