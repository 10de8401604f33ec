"""Recipes by name: ``--config demo_cpu`` names configs/demo_cpu.yaml, in a clone and in an
installed package alike.

Where the recipes live, and why there: the YAML files stay in the top-level ``configs/`` folder,
where a clone, the README, the tests and ``make demo`` name them (``configs/x.yaml``) and where
other branches keep adding them. ``pretrain/recipes`` is a symlink to that folder, so the package
finds its recipes at one place beside itself whether it runs from a clone, from an editable
install or from a wheel (which holds real copies: pyproject.toml ships ``recipes/*.yaml`` as package
data of ``pretrain``). Moving the files into the package would have broken every ``configs/...``
path users and scripts already have; mapping ``configs/`` onto a package through ``package-dir``
would need an explicit package list instead of setuptools' discovery. Where the symlink is not
checked out as one (git on Windows without symlinks), the clone's ``configs/`` beside the package
is used.

:func:`resolve_config` is the one resolver every ``--config`` goes through (it is called by
:func:`pretrain.train.config_file.read_yaml`): a path that exists wins, as given; otherwise an
argument without a folder part is a recipe name, with or without ``.yaml``; anything else is a
missing file. An unknown name is a :class:`UserError` naming the close ones.
"""

from __future__ import annotations

import difflib
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from pretrain.core.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
SUFFIXES = (".yaml", ".yml")
CONFIG_HELP = "recipe name (`vitscale recipes` lists them) or YAML file; defaults apply to missing keys"


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    description: str


def recipe_dir() -> Path | None:
    """The folder of the recipes this package ships: ``pretrain/recipes`` (installed, or the
    symlink in a clone), else the clone's ``configs/``; None when neither is there."""
    for candidate in (PACKAGE_DIR / "recipes", PACKAGE_DIR.parent / "configs"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def recipe_names() -> list[str]:
    folder = recipe_dir()
    if folder is None:
        return []
    return sorted(p.stem for p in folder.iterdir() if p.suffix in SUFFIXES and p.is_file())


def recipe_path(name: str) -> Path | None:
    """The file of the recipe ``name`` (``demo_cpu`` or ``demo_cpu.yaml``), or None."""
    folder = recipe_dir()
    if folder is None or Path(name).name != name:
        return None
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in SUFFIXES else name
    for suffix in SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def resolve_config(arg: str | Path) -> Path:
    """The file ``--config ARG`` means: ``ARG`` itself when it exists (a folder too: the reader
    then says it is a folder), else the packaged recipe named ``ARG``. Raises :class:`UserError`
    for neither, naming the close recipe names or the recipe a missing path's file name matches."""
    given = Path(arg)
    if given.exists():
        return given
    found = recipe_path(str(arg))
    if found is not None:
        return found
    names = recipe_names()
    if given.name != str(arg):
        same = recipe_path(given.name)
        hint = (f"; the installed recipe of that name is --config {same.stem}" if same is not None
                else "; pass --config with a YAML file or a recipe name (`vitscale recipes` lists them)")
        raise UserError(f"config file {str(arg)!r} does not exist{hint}")
    stem = given.stem if given.suffix in SUFFIXES else given.name
    close = difflib.get_close_matches(stem, names, n=3, cutoff=0.5)
    if close:
        hint = f"did you mean {', '.join(close)}? (`vitscale recipes` lists all {len(names)})"
    elif names:
        hint = f"recipes: {', '.join(names)}"
    else:
        hint = "this installation ships no recipes"
    raise UserError(f"config {str(arg)!r} does not exist: no such file and no recipe of that name; {hint}")


def describe(path: Path, width: int = 72) -> str:
    """One line about a recipe: the head of the comment block that opens its file (its first
    sentence up to the first colon or parenthesis: the details follow those), at most ``width``
    characters."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(part for part in lines if part)
    first = re.split(r"(?<!\bal)\.\s+(?=[A-Z(`])", text, maxsplit=1)[0]
    head = re.split(r":\s|\s\(", first, maxsplit=1)[0].rstrip(".,;")
    return textwrap.shorten(head, width=width, placeholder=" ...")


def list_recipes() -> list[Recipe]:
    paths = [(name, recipe_path(name)) for name in recipe_names()]
    return [Recipe(name, path, describe(path)) for name, path in paths]
