"""Two "nodes" on loopback (two commands, --nnodes 2, one process each) train exactly like one node
with two processes."""

import subprocess
import sys

from pretrain.train.spawn import free_port
from tests.helpers import ROOT, TINY, cli_env, read_metrics, vitscale

COMMON = ["--config", "configs/demo_cpu.yaml", *TINY, "train.steps=6", "run.deterministic=true",
          "checkpoint.every=0", "data.val=null"]


def test_two_nodes_on_loopback_equal_one_node_with_two_processes(tmp_path):
    one = tmp_path / "one"
    vitscale("pretrain", *COMMON, f"run.dir={one}", "--nproc-per-node", "2", check=True)

    two = tmp_path / "two"
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "pretrain", "pretrain", *COMMON, f"run.dir={two}",
                               "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                               "--master-addr", "127.0.0.1", "--master-port", port],
                              cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    losses_one = [r["loss"] for r in read_metrics(one)]
    losses_two = [r["loss"] for r in read_metrics(two)]
    assert len(losses_one) == 6 and losses_one == losses_two
