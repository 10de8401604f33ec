"""Two "nodes" on loopback (two commands, --nnodes 2, one process each) train exactly like one node
with two processes: the session's reference run (tests/runs.py), same command otherwise."""

import subprocess
import sys

from pretrain.train.spawn import free_port
from tests.helpers import ROOT, cli_env
from tests.runs import losses, pretrain_args, reference_run, sample_keys


def test_two_nodes_on_loopback_equal_one_node_with_two_processes(tmp_path):
    one = reference_run()
    two = tmp_path / "two"
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "pretrain", *pretrain_args(two), "--nnodes", "2",
                               "--node-rank", str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                               "--master-port", port],
                              cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert losses(two) == losses(one)  # every step, bit for bit
    for rank in (0, 1):
        assert sample_keys(two, rank) == sample_keys(one, rank)
