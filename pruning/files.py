"""Filesystem helpers shared by the pruning package: data files shipped inside PyPI packages,
and output directories that appear whole or not at all."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["STAGING_MARK", "package_data_file", "staged_directory"]

STAGING_MARK = ".partial-"  # in the name of every staging directory: ``.OUT.partial-XXXX``


def package_data_file(package: str, relative: str, missing: str) -> Path:
    """``relative`` inside an installed package, found WITHOUT importing it (some data-only
    packages import heavy runtimes in ``__init__``). Raises FileNotFoundError: ``missing`` says
    how to install the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(missing)
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the package that provides {package}")
    return path


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield a hidden ``.OUT.partial-*`` directory beside ``out``; on success it replaces
    ``out`` by one rename, on any error (or a kill) nothing that looks complete is left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_MARK}", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
