"""Launch through ``accelerate launch`` with a DeepSpeed accelerate config.

Every launcher in this package leads to the same process layout: N nodes x G ranks, each rank
one ``vitscale pretrain`` process with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
and ``MASTER_PORT`` in its environment, all meeting at one rendezvous host, every rank reading the
same resolved ``RUN_DIR/config.yaml``:

- ``vitscale pretrain --nproc-per-node G --nnodes N ...`` (and the SLURM script, one per node)
  spawns the G ranks itself with torch.distributed's launcher;
- ``deepspeed --hostfile ...`` spawns them with DeepSpeed's launcher (``launch/hostfile.py``);
- ``accelerate launch --config_file ACC.yaml ...`` (this module) spawns them with torchrun: the
  config says ``distributed_type: DEEPSPEED`` with ``deepspeed_multinode_launcher: standard``
  (torchrun on each node, static rendezvous) and ``--no_python`` runs the ``vitscale`` console
  script directly.

In each case ``vitscale pretrain`` finds the variables and joins the job; its own engine builds
DeepSpeed from the run config. The ``deepspeed_config_file`` named in the accelerate config is
``build_ds_config(cfg, world_size)`` from ``pretrain/engine.py`` written to JSON, i.e. exactly
the config the engine uses, so accelerate's view and the run agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from launch.program import program_args
from pretrain.train.config import Config


def ds_config_json(cfg: Config, world_size: int) -> dict:
    """The engine's DeepSpeed config (imports deepspeed through ``pretrain.train.engine``, hence lazily)."""
    from pretrain.train.engine import build_ds_config

    return build_ds_config(cfg, world_size)


def accelerate_config(nodes: int, gpus_per_node: int, ds_config_path: str | Path,
                      master_addr: str | None = None, master_port: int = 29500) -> dict:
    """An accelerate ``ClusterConfig`` dict (what ``accelerate config`` would write) for DeepSpeed
    on ``nodes`` x ``gpus_per_node`` processes. ``machine_rank`` is 0 here; every other node passes
    ``--machine_rank R`` on its command line. Without ``master_addr`` the command must give
    ``--main_process_ip``. Mixed precision is left to the DeepSpeed JSON (``bf16.enabled``), as
    accelerate requires when a ``deepspeed_config_file`` is given."""
    cfg = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {
            "deepspeed_config_file": str(ds_config_path),
            "deepspeed_multinode_launcher": "standard",
            "zero3_init_flag": False,
        },
        "num_machines": nodes,
        "num_processes": nodes * gpus_per_node,
        "machine_rank": 0,
        "main_process_port": master_port,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "use_cpu": False,
        "debug": False,
    }
    if master_addr:
        cfg["main_process_ip"] = master_addr
    return cfg


def accelerate_command(accelerate_yaml: str | Path, vitscale: list[str], config_path: str | Path,
                       nodes: int, master_addr: str | None = None, command: str = "pretrain") -> list[str]:
    """``accelerate launch`` argv to run on every node; for several nodes it contains the
    placeholder ``$NODE_RANK`` (the node's index, e.g. ``$SLURM_NODEID``) to be set by the shell."""
    cmd = ["accelerate", "launch", "--config_file", str(accelerate_yaml)]
    if nodes > 1:
        cmd += ["--machine_rank", "$NODE_RANK"]
        if not master_addr:
            cmd += ["--main_process_ip", "$MASTER_ADDR"]
    cmd += program_args(vitscale)
    return cmd + [command, "--config", str(config_path)]


def write_accelerate_files(acc: dict, ds: dict, accelerate_yaml: str | Path, ds_json: str | Path) -> None:
    """Write the accelerate YAML and the DeepSpeed JSON it points to."""
    for path in (accelerate_yaml, ds_json):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(ds_json).write_text(json.dumps(ds, indent=2) + "\n")
    Path(accelerate_yaml).write_text(yaml.safe_dump(acc, sort_keys=False))
