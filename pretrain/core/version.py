"""The package version, recorded in every checkpoint and printed by ``vitscale --version`` (a low
floor, so the checkpoint layer can read it without importing the package root).

pyproject.toml is the one place the version is written. An installed package (wheel or editable)
reads it from its distribution's metadata; a source tree that was never installed (``PYTHONPATH``
pointing at a clone) reads it from the pyproject.toml beside the package. ``__version__`` is
looked up when first asked for (PEP 562), so importing the package costs no metadata scan.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

DISTRIBUTION = "vitscale"
UNKNOWN = "0+unknown"


@functools.cache
def package_version() -> str:
    """The version of the ``vitscale`` distribution: its metadata, else the source tree's
    pyproject.toml, else ``0+unknown``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return pyproject_version(Path(__file__).resolve().parents[2] / "pyproject.toml") or UNKNOWN


def pyproject_version(path: Path) -> str | None:
    """``[project] version`` of the pyproject.toml at ``path`` when it describes vitscale."""
    try:
        text = path.read_text()
    except OSError:
        return None
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, flags=re.M | re.S)
    if not project or not re.search(rf'^name\s*=\s*"{DISTRIBUTION}"', project.group(1), flags=re.M):
        return None
    found = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), flags=re.M)
    return found.group(1) if found else None


def __getattr__(name: str) -> str:
    if name == "__version__":
        return package_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
