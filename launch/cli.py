"""``vitscale launch slurm | deepspeed | accelerate``: a run config + a cluster -> a launch;
``vitscale launch slurm-array --shards-write SRC OUT --parts N``: a shard set written by a SLURM
job array (:mod:`launch.shards_array`).

Each subcommand loads ``--config`` with the ``section.key=value`` overrides, checks the global
batch arithmetic for the launch's world size, and (unless ``--dry-run``) writes the resolved
config to ``RUN_DIR/config.yaml``; every rank of the launch reads that one file, so the overrides
are baked in and relaunching the same command resumes the same run. All launchers give the same
process layout (see ``launch/accelerate_cfg.py``).

Examples::

    vitscale launch slurm --config configs/pretrain_vit_h14_in21k.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 48:00:00 --cpus-per-task 64 --submit train.steps=90000
    vitscale launch deepspeed --config configs/x.yaml --hostfile hosts.txt --dry-run
    vitscale launch accelerate --config configs/x.yaml --nodes 2 --gpus-per-node 8 --master-addr node-001
    vitscale launch slurm-array --shards-write /data/in21k /data/in21k-shards --parts 16 --cpus-per-task 32 \
        --partition cpu --time 12:00:00 --submit -- --resize-max 512 --quality 90
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from launch import accelerate_cfg, hostfile, shards_array, slurm
from pretrain.core.errors import UserError
from pretrain.train.config import Config
from pretrain.train.config_file import load_config, save_config
from pretrain.train.recipes import CONFIG_HELP

COMMANDS = ("pretrain", "finetune")


def vitscale_command() -> list[str]:
    """How ranks run our CLI: the ``vitscale`` console script of this environment (next to the
    interpreter, else on PATH) by absolute path, else ``python -m pretrain``."""
    beside = Path(sys.executable).parent / "vitscale"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("vitscale")
    if found:
        return [str(Path(found).absolute())]
    return [sys.executable, "-m", "pretrain"]


def resolve_run(args: argparse.Namespace, world_size: int) -> tuple[Config, Path, Path]:
    """(config, absolute run dir, path of the resolved config in it), after the checks
    ``vitscale pretrain`` runs before starting (batch arithmetic, data, run dir, disk, attention;
    for the cluster, not this machine) unless ``--no-checks``. The batch line, with the
    accumulation derived for this world size, goes to stderr."""
    from pretrain.train.checks import raise_on_failure, run_cheap_checks

    cfg = load_config(args.config, args.overrides)
    cfg.train.check_world(world_size)
    if not args.no_checks:
        raise_on_failure(run_cheap_checks(cfg, world_size, runs_here=False, probe_gpu=False))
    print(f"vitscale launch: {cfg.batch_line(world_size)}", file=sys.stderr)
    run_dir = Path(cfg.run.dir).absolute()
    return cfg, run_dir, run_dir / "config.yaml"


def _parser(name: str, description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"vitscale launch {name}", description=description)
    ap.add_argument("--config", required=True, help=CONFIG_HELP)
    ap.add_argument("--command", choices=COMMANDS, default="pretrain", help="what each rank runs")
    ap.add_argument("overrides", nargs="*", help="section.key=value, baked into RUN_DIR/config.yaml")
    ap.add_argument("--no-checks", action="store_true",
                    help="skip the data / run dir checks (for a login node that cannot see the cluster's disks)")
    return ap


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UserError(f"{flag} {value}: must be >= 1")


def slurm_main(argv: list[str]) -> int:
    ap = _parser("slurm", "Write (and optionally submit) an sbatch script: one task per node.")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--partition")
    ap.add_argument("--time", help="time limit, e.g. 48:00:00")
    ap.add_argument("--account")
    ap.add_argument("--qos")
    ap.add_argument("--cpus-per-task", type=int, help="CPUs for each node's task (all its ranks and workers)")
    ap.add_argument("--job-name")
    ap.add_argument("--extra-sbatch", default="",
                    help='more sbatch options, given with "=": --extra-sbatch="--exclusive --mem=0"')
    ap.add_argument("--output", help="script path (default RUN_DIR/launch.sbatch)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the script, write nothing")
    mode.add_argument("--submit", action="store_true", help="write the script and run sbatch on it")
    args = ap.parse_intermixed_args(argv)
    _positive(args.nodes, "--nodes")
    _positive(args.gpus_per_node, "--gpus-per-node")
    cfg, run_dir, config_path = resolve_run(args, args.nodes * args.gpus_per_node)
    job = slurm.SlurmJob(
        run_dir=run_dir, config_path=config_path, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        vitscale=tuple(vitscale_command()), workdir=Path.cwd(), command=args.command,
        partition=args.partition, time=args.time, account=args.account, qos=args.qos,
        cpus_per_task=args.cpus_per_task, job_name=args.job_name,
        extra_sbatch=tuple(shlex.split(args.extra_sbatch)),
    )
    text = slurm.sbatch_script(job)
    if args.dry_run:
        print(text, end="")
        return 0
    save_config(cfg, config_path)
    job.log_dir.mkdir(parents=True, exist_ok=True)
    script_path = Path(args.output).absolute() if args.output else run_dir / "launch.sbatch"
    script = slurm.write_script(text, script_path)
    print(f"wrote {script}\n  resolved config: {config_path}\n  logs: {job.log_dir}/")
    if args.submit:
        print(slurm.submit(script))
    else:
        print(f"submit with: sbatch {shlex.quote(str(script))}")
    return 0


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise UserError(f"`{name}` is not installed in this environment: pip install {name}")
    return found


def deepspeed_main(argv: list[str]) -> int:
    ap = _parser("deepspeed", "Run (or print) the DeepSpeed launcher command for a hostfile.")
    ap.add_argument("--hostfile", required=True, help="one 'HOST slots=N' line per node")
    ap.add_argument("--gpus-per-node", type=int, help="GPUs per host (default: each host's slots)")
    ap.add_argument("--master-port", type=int, default=29500)
    ap.add_argument("--dry-run", action="store_true", help="print the command, write and run nothing")
    args = ap.parse_intermixed_args(argv)
    hosts = hostfile.read_hostfile(args.hostfile)
    world = hostfile.world_size(hosts, args.gpus_per_node)
    cfg, _, config_path = resolve_run(args, world)
    cmd = hostfile.deepspeed_command(Path(args.hostfile).absolute(), hosts, vitscale_command(), config_path,
                                     args.master_port, args.gpus_per_node, args.command)
    print(f"# {len(hosts)} host(s), {world} ranks; rendezvous {next(iter(hosts))}:{args.master_port}")
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    launcher = _tool("deepspeed")
    save_config(cfg, config_path)
    return subprocess.call([launcher, *cmd[1:]])


def accelerate_main(argv: list[str]) -> int:
    ap = _parser("accelerate", "Write an accelerate DeepSpeed config and print the launch command.")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--output", help="accelerate YAML path (default RUN_DIR/accelerate.yaml)")
    ap.add_argument("--master-addr", help="rendezvous host (node 0); else given at launch time")
    ap.add_argument("--master-port", type=int, default=29500,
                    help="rendezvous port; 0 (one node only): accelerate picks a free port at launch")
    ap.add_argument("--dry-run", action="store_true", help="print the files and command, write nothing")
    args = ap.parse_intermixed_args(argv)
    _positive(args.nodes, "--nodes")
    _positive(args.gpus_per_node, "--gpus-per-node")
    if not 0 <= args.master_port <= 65535 or (args.master_port == 0 and args.nodes > 1):
        raise UserError(f"--master-port {args.master_port}: give a TCP port in 1..65535 that every node "
                        f"reaches (0, a free port picked at launch, works for one node only)")
    world = args.nodes * args.gpus_per_node
    cfg, run_dir, config_path = resolve_run(args, world)
    acc_path = Path(args.output).absolute() if args.output else run_dir / "accelerate.yaml"
    ds_path = run_dir / "ds_config.json"
    acc = accelerate_cfg.accelerate_config(args.nodes, args.gpus_per_node, ds_path, args.master_addr,
                                           args.master_port)
    ds = accelerate_cfg.ds_config_json(cfg, world)
    cmd = accelerate_cfg.accelerate_command(acc_path, vitscale_command(), config_path, args.nodes,
                                            args.master_addr, args.command)
    if args.dry_run:
        print(f"# {acc_path}\n{yaml.safe_dump(acc, sort_keys=False)}# {ds_path}\n{json.dumps(ds, indent=2)}")
    else:
        save_config(cfg, config_path)
        accelerate_cfg.write_accelerate_files(acc, ds, acc_path, ds_path)
        print(f"wrote {acc_path}\n  DeepSpeed config: {ds_path}\n  resolved config: {config_path}")
    if args.nodes > 1:
        print(f"launch on every node with NODE_RANK=0..{args.nodes - 1} (e.g. $SLURM_NODEID)"
              + ("" if args.master_addr else " and MASTER_ADDR=node 0's host") + ":")
    else:
        print("launch:")
    print(" ".join(a if a.startswith("$") else shlex.quote(a) for a in cmd))
    return 0


def slurm_array_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="vitscale launch slurm-array",
        description="Write (and optionally submit) a SLURM job array that writes a shard set in N parts "
                    "(`vitscale shards write SRC OUT --part I/N` per task) and a merge job that runs after it. "
                    "Options after `--` go to `shards write` (e.g. -- --resize-max 512 --quality 90).")
    ap.add_argument("--shards-write", nargs=2, required=True, metavar=("SRC", "OUT"), type=Path,
                    help="the source (ImageFolder or manifest) and the output folder, as for `shards write`")
    ap.add_argument("--parts", type=int, required=True, metavar="N", help="array tasks (machines), one part each")
    ap.add_argument("--cpus-per-task", type=int, help="CPUs per part (its encoding processes)")
    ap.add_argument("--max-parallel", type=int, help="run at most this many parts at once (--array=0-N%%P)")
    ap.add_argument("--partition")
    ap.add_argument("--time", help="time limit per part, e.g. 12:00:00")
    ap.add_argument("--account")
    ap.add_argument("--qos")
    ap.add_argument("--job-name")
    ap.add_argument("--extra-sbatch", default="",
                    help='more sbatch options for both jobs, given with "=": --extra-sbatch="--mem=64G"')
    ap.add_argument("--output-dir", type=Path, help="where the scripts go (default OUT/_parts/slurm)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the scripts, write nothing")
    mode.add_argument("--submit", action="store_true", help="write the scripts and submit both (sbatch)")
    own, write_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = ap.parse_args(own)
    src, out = (p.absolute() for p in args.shards_write)
    from data_tools.cli import check_write_args

    check_write_args([str(src), str(out), *write_args])  # a wrong option fails here, not on the cluster
    job = shards_array.ShardsArrayJob(
        src=src, out=out, parts=args.parts, vitscale=tuple(vitscale_command()), workdir=Path.cwd(),
        write_args=tuple(write_args), partition=args.partition, time=args.time, account=args.account,
        qos=args.qos, cpus_per_task=args.cpus_per_task, job_name=args.job_name, max_parallel=args.max_parallel,
        extra_sbatch=tuple(shlex.split(args.extra_sbatch)))
    folder = args.output_dir.absolute() if args.output_dir else job.script_dir
    write_path, merge_path = folder / "write.sbatch", folder / "merge.sbatch"
    texts = {write_path: shards_array.write_script(job), merge_path: shards_array.merge_script(job)}
    if args.dry_run:
        for path, text in texts.items():
            print(f"# ---- {path}\n{text}", end="")
        print("# ---- submit with:\n" + "\n".join(shards_array.submit_lines(write_path, merge_path)))
        return 0
    job.script_dir.mkdir(parents=True, exist_ok=True)  # the logs go there
    for path, text in texts.items():
        slurm.write_script(text, path)
    print(f"wrote {write_path} ({job.parts} array tasks) and {merge_path}\n  logs: {job.script_dir}/")
    if args.submit:
        array_id = slurm.submit(write_path, ("--parsable",)).split(";")[0]
        print(f"submitted array job {array_id}")
        print(slurm.submit(merge_path, (f"--dependency=afterok:{array_id}",)))
    else:
        print("submit with:\n  " + "\n  ".join(shards_array.submit_lines(write_path, merge_path)))
    return 0


SUBCOMMANDS = {
    "slurm": (slurm_main, "write/submit an sbatch script (one task per node, requeue on preemption)"),
    "deepspeed": (deepspeed_main, "run the DeepSpeed launcher over a hostfile"),
    "accelerate": (accelerate_main, "write an accelerate DeepSpeed config and print `accelerate launch`"),
    "slurm-array": (slurm_array_main, "write/submit a SLURM job array writing a shard set in N parts + merge"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: vitscale launch {slurm,deepspeed,accelerate} --config FILE [options] [key=value ...]\n"
             "       vitscale launch slurm-array --shards-write SRC OUT --parts N [options] [-- write options]\n\n")
    usage += "\n".join(f"  {name:<12} {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] not in SUBCOMMANDS:
        raise UserError(f"unknown launcher {argv[0]!r}: use one of {', '.join(SUBCOMMANDS)}")
    return SUBCOMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
