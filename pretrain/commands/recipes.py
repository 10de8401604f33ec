"""``vitscale recipes [NAME]``: the run recipes this installation ships, usable by name.

Without NAME, one line per recipe: its name (what ``--config`` takes) and the head of the comment
that opens it. With NAME, the recipe's YAML, to read or to start a recipe of one's own from
(``vitscale recipes demo_cpu > mine.yaml``).
"""

from __future__ import annotations

import argparse

from pretrain.core.errors import UserError
from pretrain.core.help_text import doc_help
from pretrain.train.recipes import list_recipes, recipe_dir, resolve_config


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vitscale recipes", description=doc_help(__doc__, paragraphs=2))
    p.add_argument("name", nargs="?", help="print this recipe's YAML")
    p.add_argument("--path", action="store_true", help="print the recipe's file path instead of its YAML")
    args = p.parse_args(argv)
    if args.name:
        path = resolve_config(args.name)
        if not path.is_file():
            raise UserError(f"{args.name!r} is not a recipe file: give a name that `vitscale recipes` lists")
        print(path if args.path else path.read_text(), end="\n" if args.path else "")
        return 0
    recipes = list_recipes()
    if not recipes:
        raise UserError("this installation ships no recipes (its pretrain/recipes folder is missing): reinstall "
                        "vitscale, or pass --config with a YAML file")
    width = max(len(r.name) for r in recipes)
    print(f"{len(recipes)} recipes in {recipe_dir()}  (vitscale pretrain --config NAME [key=value ...])")
    for r in recipes:
        print(f"  {r.name:<{width}}  {r.description}")
    return 0
