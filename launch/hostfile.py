"""Launch through the DeepSpeed launcher from an MPI-style hostfile.

The hostfile has one ``HOST slots=N`` line per node (N = GPUs to use there); ``#`` starts a
comment, blank lines are ignored. :func:`parse_hostfile` is stricter than DeepSpeed's own parser
(which ignores trailing text and only reports the first bad entry without its line number): every
mistake names the line.

How ``deepspeed`` runs the user script (``deepspeed/launcher/runner.py`` and ``launch.py``): per
rank it executes ``python -u SCRIPT --local_rank=R ARGS``, with ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the environment. ``--no_python`` drops
the interpreter (so the ``vitscale`` console script runs directly), ``--module`` runs
``python -u -m SCRIPT``, and ``--no_local_rank`` drops ``--local_rank=R``, which would otherwise
land *before* ``pretrain`` and break the ``vitscale`` subcommand dispatch. The generated command is
therefore ``deepspeed --hostfile H --master_addr FIRST --master_port P [--num_gpus G]
[--no_ssh_check] --no_local_rank --no_python /path/to/vitscale pretrain --config RUN_DIR/config.yaml`` (or
``--module pretrain pretrain ...`` when no console script is installed); ``vitscale pretrain``
sees the environment and joins the job instead of spawning its own processes. Multi-node runs
need passwordless ssh and pdsh (DeepSpeed's default multi-node backend), and the same paths on
every node.
"""

from __future__ import annotations

import re
from pathlib import Path

from launch.program import program_args
from pretrain.core.errors import UserError

_LINE = re.compile(r"^(?P<host>[^\s#=]+)\s+slots=(?P<slots>\d+)\s*$")


def parse_hostfile(text: str, source: str = "hostfile") -> dict[str, int]:
    """``{host: slots}`` in file order; :class:`UserError` naming the line for any bad entry,
    a duplicate host, zero slots, or no host at all."""
    hosts: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise UserError(f"{source} line {number}: {raw.strip()!r} is not 'HOST slots=N' "
                            f"(e.g. 'node-001 slots=8'); fix or comment out the line with '#'")
        host, slots = match["host"], int(match["slots"])
        if host in hosts:
            raise UserError(f"{source} line {number}: host {host!r} is listed twice; keep one line per host")
        if slots < 1:
            raise UserError(f"{source} line {number}: {host} has slots={slots}; "
                            f"give the number of GPUs to use there (>= 1)")
        hosts[host] = slots
    if not hosts:
        raise UserError(f"{source} lists no hosts: write one 'HOST slots=N' line per node")
    return hosts


def read_hostfile(path: str | Path) -> dict[str, int]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"hostfile {str(p)!r} does not exist: write one 'HOST slots=N' line per node")
    return parse_hostfile(p.read_text(), source=f"hostfile {str(p)!r}")


def world_size(hosts: dict[str, int], gpus_per_node: int | None = None) -> int:
    """Ranks the launcher starts: every host's slots, or ``gpus_per_node`` on each host (DeepSpeed's
    ``--num_gpus`` replaces the slot counts), checked against the slots."""
    if gpus_per_node is None:
        return sum(hosts.values())
    if gpus_per_node < 1:
        raise UserError(f"--gpus-per-node {gpus_per_node}: must be >= 1")
    short = [f"{h} (slots={s})" for h, s in hosts.items() if s < gpus_per_node]
    if short:
        raise UserError(f"--gpus-per-node {gpus_per_node} is more than the hostfile offers on "
                        f"{', '.join(short)}: lower --gpus-per-node or fix the slots")
    return gpus_per_node * len(hosts)


def deepspeed_command(hostfile: str | Path, hosts: dict[str, int], vitscale: list[str],
                      config_path: str | Path, master_port: int = 29500, gpus_per_node: int | None = None,
                      command: str = "pretrain") -> list[str]:
    """The ``deepspeed`` launcher command (argv) that runs ``vitscale COMMAND`` (pretrain or
    finetune) on every slot.

    ``vitscale`` is how to run our CLI: ``[path/to/vitscale]`` (console script, run with
    ``--no_python``) or ``[python, "-m", "pretrain"]`` (run with ``--module``; the launcher
    supplies its own interpreter). The rendezvous host is the hostfile's first host. With a
    single host DeepSpeed launches locally, but would still test ssh to it first, so
    ``--no_ssh_check`` is added there.
    """
    cmd = ["deepspeed", "--hostfile", str(hostfile), "--master_addr", next(iter(hosts)),
           "--master_port", str(master_port)]
    if gpus_per_node is not None:
        cmd += ["--num_gpus", str(gpus_per_node)]
    if len(hosts) == 1:
        cmd.append("--no_ssh_check")
    cmd.append("--no_local_rank")
    cmd += program_args(vitscale)
    return cmd + [command, "--config", str(config_path)]
