"""The package as `pip install .` ships it, and the CLI around it: every module and recipe in the
wheel (read off setuptools' own configuration, no build), recipes by name through the one
resolver, `vitscale recipes`, `--version`, and `--help` of every command as plain text. The built
wheel itself is installed and run by scripts/check_wheel.sh in CI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pretrain import cli
from pretrain.core import version
from pretrain.core.errors import UserError
from pretrain.core.help_text import doc_help, plain
from pretrain.train import recipes
from pretrain.train.config_file import load_config
from tests.helpers import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _setuptools_view(monkeypatch) -> tuple[set[str], set[tuple[str, Path]]]:
    """(packages, {(path inside the wheel, source file)}) as setuptools computes them from
    pyproject.toml for `pip install .`."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)
    dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    dist.include_package_data = False  # that path runs egg_info (writes files); our data is package_data
    build_py = dist.get_command_obj("build_py")
    build_py.ensure_finalized()
    data = {(f"{package.replace('.', '/')}/{name}", (ROOT / src / name).resolve())
            for package, src, _, names in build_py.data_files for name in names}
    return set(dist.packages or ()), data


def test_setuptools_ships_every_package_and_every_recipe(monkeypatch):
    packages, data = _setuptools_view(monkeypatch)
    on_disk = {".".join(init.parent.relative_to(ROOT).parts)
               for root in ("pretrain", "data_tools", "launch") for init in (ROOT / root).rglob("__init__.py")}
    assert on_disk <= packages, f"not shipped: {sorted(on_disk - packages)}"
    assert packages <= on_disk, f"shipped but not ours: {sorted(packages - on_disk)}"
    assert CONFIGS, "no recipes found in configs/"
    for config in CONFIGS:
        assert (f"pretrain/recipes/{config.name}", config.resolve()) in data, f"{config.name} is not package data"


def test_a_recipe_is_named_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_path = load_config(ROOT / "configs" / "demo_cpu.yaml", ["train.steps=5"])
    assert load_config("demo_cpu", ["train.steps=5"]) == by_path
    assert load_config("demo_cpu.yaml", ["train.steps=5"]) == by_path
    assert recipes.resolve_config("pretrain_vit_h14_in21k").resolve() == \
        (ROOT / "configs" / "pretrain_vit_h14_in21k.yaml").resolve()


def test_an_existing_path_wins_over_a_recipe_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo_cpu.yaml").write_text(yaml.safe_dump({"train": {"steps": 7}}))
    assert load_config("demo_cpu.yaml").train.steps == 7
    assert load_config("demo_cpu").train.steps == 150  # no such file: the recipe
    (tmp_path / "demo_cpu").write_text(yaml.safe_dump({"train": {"steps": 9}}))
    assert load_config("demo_cpu").train.steps == 9


@pytest.mark.parametrize("argv", [
    ["pretrain", "--config", "pretrain_vit_h14_in21"],
    ["finetune", "--config", "pretrain_vit_h14_in21", "--init", "x.safetensors"],
    ["launch", "slurm", "--config", "pretrain_vit_h14_in21", "--nodes", "1", "--gpus-per-node", "1", "--dry-run"],
])
def test_an_unknown_recipe_name_is_one_line_naming_close_ones(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*argv, f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "pretrain_vit_h14_in21" in err and "did you mean pretrain_vit_h14_in21k" in err, err
    assert not (tmp_path / "run").exists()


def test_preflight_reports_an_unknown_recipe_name_as_its_config_check(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["preflight", "--config", "pretrain_vit_h14_in21.yaml"]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL ")]
    assert len(failed) == 1 and "config" in failed[0] and "did you mean pretrain_vit_h14_in21k" in failed[0]
    assert cli.main(["preflight", "--config", "demo_cpu", "--json"]) == 0
    assert '"config"' in capsys.readouterr().out


def test_a_missing_path_names_the_recipe_its_file_name_matches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # e.g. a README command run outside a clone
    with pytest.raises(UserError, match=r"'configs/demo_cpu.yaml' does not exist; .* --config demo_cpu$"):
        load_config("configs/demo_cpu.yaml")
    with pytest.raises(UserError, match="'nowhere/mine.yaml' does not exist; pass --config"):
        load_config("nowhere/mine.yaml")
    with pytest.raises(UserError, match="no such file and no recipe of that name; recipes: demo_augreg_cpu, "):
        load_config("zzzz")


def test_vitscale_recipes_lists_every_recipe_and_prints_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{len(CONFIGS)} recipes in ")
    listed = dict(re.match(r"^  (\S+)\s+(.+)$", line).groups() for line in lines[1:])
    assert sorted(listed) == [c.stem for c in CONFIGS]
    assert listed["demo_cpu"] == "Tiny twin of the pretraining recipes"
    assert listed["pretrain_vit_h14_in21k"] == "ViT-H/14 on ImageNet-21k with the paper's in21k settings"
    assert all(d and "#" not in d and len(d) <= 72 for d in listed.values())
    assert cli.main(["recipes", "demo_cpu"]) == 0
    assert capsys.readouterr().out == (ROOT / "configs" / "demo_cpu.yaml").read_text()
    assert cli.main(["recipes", "demo_cpu.yaml", "--path"]) == 0
    assert Path(capsys.readouterr().out.strip()) == (ROOT / "configs" / "demo_cpu.yaml").resolve()
    assert cli.main(["recipes", "demo_cpux"]) == 2
    assert "did you mean demo_cpu" in capsys.readouterr().err


def test_recipes_are_found_beside_the_package_even_without_the_symlink(tmp_path, monkeypatch):
    """A clone checked out without symlinks (pretrain/recipes is then a small text file) reads
    the clone's configs/."""
    package = tmp_path / "pretrain"
    package.mkdir()
    (package / "recipes").write_text("../configs")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text("# Mine: a recipe\ntrain: {steps: 3}\n")
    monkeypatch.setattr(recipes, "PACKAGE_DIR", package)
    assert recipes.recipe_names() == ["mine"]
    assert recipes.list_recipes()[0].description == "Mine"


def test_version_flag_prints_the_distributions_version(capsys):
    expected = version.pyproject_version(ROOT / "pyproject.toml")
    assert expected and re.fullmatch(r"\d+\.\d+\.\d+\S*", expected)
    for flag in ("--version", "-V"):
        assert cli.main([flag]) == 0
        assert capsys.readouterr().out == f"vitscale {expected}\n"


def test_version_falls_back_to_pyproject_when_not_installed(tmp_path, monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    version.package_version.cache_clear()
    try:
        assert version.package_version() == version.pyproject_version(ROOT / "pyproject.toml")
    finally:
        version.package_version.cache_clear()
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "other"\nversion = "9.9"\n')
    assert version.pyproject_version(other) is None
    assert version.pyproject_version(tmp_path / "missing.toml") is None


HELP = [[], ["--help"], ["bench", "--help"], ["launch", "--help"]]
HELP += [[name, "--help"] for name in cli.COMMANDS if name not in ("bench", "launch")]
HELP += [["bench", kind, "--help"] for kind in ("loader", "train", "fewshot")]
HELP += [["shards", kind, "--help"] for kind in ("write", "verify", "stats", "synth")]
HELP += [["launch", kind, "--help"] for kind in ("slurm", "deepspeed", "accelerate")]


@pytest.mark.parametrize("argv", HELP, ids=lambda argv: " ".join(argv) or "bare")
def test_every_help_exits_0_in_plain_text(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as done:  # argparse's --help
        code = done.code
    out = capsys.readouterr().out
    assert code in (0, None) and out.strip(), out
    assert not re.search(r":(mod|func|class|meth|attr|pep):|``", out), out


def test_bench_without_a_kind_is_usage_and_exit_2(capsys):
    assert cli.main(["bench"]) == 2 and cli.main(["bench", "fast"]) == 2
    assert "usage: vitscale bench {loader,train,fewshot}" in capsys.readouterr().err


def test_plain_strips_rest_markup():
    text = ("``vitscale evaluate``: see :mod:`pretrain.data.shards`, :func:`~pretrain.formats.read_weights`, "
            ":class:`the loader <pretrain.data.loader.ShardEval>` and **this**.\n\nSecond paragraph.")
    assert plain(text) == ("vitscale evaluate: see pretrain.data.shards, read_weights, the loader and this."
                           "\n\nSecond paragraph.")
    assert doc_help(text) == plain(text.split("\n\n")[0])
    assert doc_help(None) == ""
