"""``vitscale pretrain --config FILE [key=value ...]``: validate, then spawn or join the job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.train.config import Config, load_config
from pretrain.train.spawn import add_launch_args, in_launched_job, spawn, strip_launch_args, world_size_of


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="YAML recipe (see configs/); defaults apply to missing keys")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")
    p.add_argument("--resume", metavar="PATH", help="resume from this checkpoint (default: run.dir's latest)")
    p.add_argument("--no-resume", action="store_true", help="refuse to start if run.dir has checkpoints")
    add_launch_args(p)
    return p


def check_before_launch(cfg: Config, world: int) -> None:
    """The cheap checks that must pass before any process or GPU work."""
    cfg.train.check_world(world)
    from launch.preflight import raise_on_failure, run_cheap_checks

    raise_on_failure(run_cheap_checks(cfg, world))


def check_resume_before_launch(cfg: Config, command: str, args: argparse.Namespace) -> None:
    """Resume mistakes (--no-resume over checkpoints, a damaged or mismatched checkpoint) exit 2
    here, before any process starts; see :func:`pretrain.checkpoint.resume.check_before_launch`."""
    resume, no_resume = getattr(args, "resume", None), getattr(args, "no_resume", False)
    if not resume and not (Path(cfg.run.dir) / "checkpoints").is_dir():
        return
    from pretrain.checkpoint.resume import check_before_launch as check_resume

    check_resume(cfg, command, resume, no_resume, hash_files=args.node_rank == 0)


def launch_or_run(command: str, argv: list[str], args: argparse.Namespace, cfg: Config, worker) -> int:
    if in_launched_job():
        return worker()
    check_before_launch(cfg, world_size_of(args))
    check_resume_before_launch(cfg, command, args)
    return spawn(args, command, strip_launch_args(argv))


def main(argv: list[str]) -> int:
    args = build_parser("vitscale pretrain", "Pretrain a ViT with DeepSpeed ZeRO.").parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)

    def worker() -> int:
        from pretrain.train.trainer import run_worker

        return run_worker(cfg, "pretrain", args.resume, args.no_resume)

    return launch_or_run("pretrain", argv, args, cfg, worker)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
