"""`vitscale` console script: one subcommand per job, each implemented in its own module.

Every handler is ``main(argv: list[str]) -> int``; a :class:`UserError` anywhere becomes a
one-paragraph message on stderr and exit status 2 (in a rank started by ``vitscale pretrain``
the message goes to the launcher instead, which prints it once for the whole job).

This module is the roof of the import floors: it names every subcommand's module, including the
``data_tools`` and ``launch`` packages, and imports it by name only when that command runs.
Nothing else in ``pretrain`` imports those packages.
"""

from __future__ import annotations

import importlib
import os
import sys

from pretrain.core.errors import UserError

# subcommand -> (module, help line); modules are imported only when their command runs.
COMMANDS = {
    "info": ("pretrain.commands.info", "parameters, GMACs, TFLOPs per image of a model variant"),
    "recipes": ("pretrain.commands.recipes", "the run recipes shipped with vitscale (--config takes their names)"),
    "pretrain": ("pretrain.commands.pretrain", "pretrain a ViT (spawns or joins the distributed job)"),
    "finetune": ("pretrain.commands.finetune", "fine-tune from a checkpoint at a new resolution"),
    "evaluate": ("pretrain.commands.evaluate", "top-1/top-5 of a checkpoint on a shard set"),
    "convert": ("pretrain.commands.convert", "convert checkpoints between formats, verified by logits"),
    "inspect": ("pretrain.commands.inspect", "what a checkpoint or weights file holds"),
    "report": ("pretrain.commands.report", "figures and health of one or more runs as an HTML page"),
    "shards": ("data_tools.cli", "write (one machine or many) / merge / index / verify / stats / dedup of shards"),
    "launch": ("launch.cli", "cluster launches: slurm, slurm-array (shards write), deepspeed hostfile, accelerate"),
    "preflight": ("launch.preflight", "check a config against a cluster before spending GPU hours"),
    "bench": ("pretrain.commands.bench", "benchmarks: loader, train"),
}


def _usage() -> str:
    lines = ["usage: vitscale COMMAND [args]  (vitscale COMMAND --help for its options; vitscale --version)", ""]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from pretrain.core.version import package_version

        print(f"vitscale {package_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vitscale: unknown command {name!r}.\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        code = int(module.main(rest) or 0)
    except BrokenPipeError:  # `vitscale inspect RUN | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UserError as err:
        from pretrain.train.spawn import exit_rank, report_rank_error

        if report_rank_error(str(err), getattr(err, "secondary", False)):
            exit_rank(2)
        print(f"vitscale {name}: error: {err}", file=sys.stderr)
        return 2
    if name in ("pretrain", "finetune"):
        from pretrain.train.spawn import exit_rank, in_launched_job

        if in_launched_job():
            exit_rank(code)  # a rank that finished: its files are closed and it has left the process group
    return code


if __name__ == "__main__":
    sys.exit(main())
