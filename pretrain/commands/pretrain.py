"""``vitscale pretrain --config RECIPE [key=value ...]``: check, then spawn or join the job."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pretrain.train.config import Config, identity
from pretrain.train.config_file import load_config
from pretrain.train.recipes import CONFIG_HELP
from pretrain.train.spawn import (
    add_launch_args,
    bind_to_launcher,
    check_launch_args,
    in_launched_job,
    spawn,
    strip_launch_args,
    world_size_of,
)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")
    p.add_argument("--resume", metavar="PATH", help="resume from this checkpoint (default: run.dir's latest)")
    p.add_argument("--no-resume", action="store_true", help="refuse to start if run.dir has checkpoints")
    p.add_argument("--force-unlock", action="store_true",
                   help="take run.dir's lock even if another job seems to hold it (only when that job is gone)")
    add_launch_args(p)
    return p


def check_before_launch(cfg: Config, args: argparse.Namespace) -> None:
    """What can be checked before anything is created (exit 2 with one line each): launch flags,
    batch arithmetic, data, run dir, disk, attention backend."""
    from pretrain.train.checks import raise_on_failure, run_cheap_checks

    check_launch_args(args)
    raise_on_failure(run_cheap_checks(cfg, world_size_of(args), runs_here=True))


def check_resume(cfg: Config, mode: str, args: argparse.Namespace) -> None:
    """The checkpoint a resume would use fits the run (checked once run.dir is locked)."""
    from pretrain.checkpoint.resume import check_before_launch as check_checkpoint

    resume, no_resume = getattr(args, "resume", None), getattr(args, "no_resume", False)
    if resume or (Path(cfg.run.dir) / "checkpoints").is_dir():
        world = world_size_of(args)
        check_checkpoint(Path(cfg.run.dir), cfg.checkpoint.keep, identity(cfg.for_world(world), mode), resume,
                         no_resume, hash_files=args.node_rank == 0)


def owns_run_dir(args: argparse.Namespace) -> bool:
    """Whether this process holds run.dir's lock for the job: our launcher on node 0, or rank 0
    of a job another launcher started (see :mod:`pretrain.checkpoint.lock`)."""
    if in_launched_job():
        return not os.environ.get("VITSCALE_SPAWNER") and os.environ.get("RANK") == "0"
    return args.node_rank == 0


def launch_or_run(mode: str, argv: list[str], args: argparse.Namespace, cfg: Config,
                  worker: Callable[[], int]) -> int:
    """Inside a launched job run this rank; else check everything and start the ranks. The
    process that owns the job holds run.dir's lock while it runs."""
    from pretrain.checkpoint.lock import RunLock

    launched = in_launched_job()
    if launched:
        bind_to_launcher()
    else:
        check_before_launch(cfg, args)
    lock = RunLock(cfg.run.dir, mode, force=args.force_unlock) if owns_run_dir(args) else contextlib.nullcontext()
    with lock:
        if launched:
            return worker()
        check_resume(cfg, mode, args)
        return spawn(args, mode, strip_launch_args(argv))


def main(argv: list[str]) -> int:
    args = build_parser("vitscale pretrain", "Pretrain a ViT with DeepSpeed ZeRO.").parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)

    def worker() -> int:
        from pretrain.train.worker import run_worker

        return run_worker(cfg, "pretrain", args.resume, args.no_resume, recipe=args.config)

    return launch_or_run("pretrain", argv, args, cfg, worker)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
