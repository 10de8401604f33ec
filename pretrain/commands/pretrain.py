"""``vitscale pretrain --config FILE [key=value ...]``: check, then spawn or join the job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pretrain.train.config import Config, identity, load_config
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
    p.add_argument("--config", help="YAML recipe (see configs/); defaults apply to missing keys")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")
    p.add_argument("--resume", metavar="PATH", help="resume from this checkpoint (default: run.dir's latest)")
    p.add_argument("--no-resume", action="store_true", help="refuse to start if run.dir has checkpoints")
    add_launch_args(p)
    return p


def check_before_launch(cfg: Config, mode: str, args: argparse.Namespace) -> None:
    """Everything that can be checked before a process starts (exit 2 with one line each):
    launch flags, batch arithmetic, data, run dir, disk, attention backend, and the checkpoint a
    resume would use."""
    from pretrain.checkpoint.resume import check_before_launch as check_resume
    from pretrain.train.checks import raise_on_failure, run_cheap_checks

    check_launch_args(args)
    world = world_size_of(args)
    raise_on_failure(run_cheap_checks(cfg, world, runs_here=True))
    resume, no_resume = getattr(args, "resume", None), getattr(args, "no_resume", False)
    if resume or (Path(cfg.run.dir) / "checkpoints").is_dir():
        check_resume(Path(cfg.run.dir), cfg.checkpoint.keep, identity(cfg.for_world(world), mode), resume, no_resume,
                     hash_files=args.node_rank == 0)


def launch_or_run(mode: str, argv: list[str], args: argparse.Namespace, cfg: Config,
                  worker: Callable[[], int]) -> int:
    """Inside a launched job run this rank; else check everything and start the ranks."""
    if in_launched_job():
        bind_to_launcher()
        return worker()
    check_before_launch(cfg, mode, args)
    return spawn(args, mode, strip_launch_args(argv))


def main(argv: list[str]) -> int:
    args = build_parser("vitscale pretrain", "Pretrain a ViT with DeepSpeed ZeRO.").parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)

    def worker() -> int:
        from pretrain.train.trainer import run_worker

        return run_worker(cfg, "pretrain", args.resume, args.no_resume)

    return launch_or_run("pretrain", argv, args, cfg, worker)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
