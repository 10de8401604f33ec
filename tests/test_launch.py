"""Launchers: the sbatch script (syntax, resources, rank logic, preemption), the DeepSpeed hostfile
command and the accelerate config, each exercised through the real tools where they run on a CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch import cli, hostfile, slurm
from pretrain.core.errors import UserError
from pretrain.train.config_file import load_config
from pretrain.train.spawn import free_port

VENV_BIN = Path(sys.executable).parent
HOSTS = ["gpu-a17", "gpu-a18", "gpu-b01", "gpu-b02"]


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    cfg = tmp_path / "recipe.yaml"
    recipe = {"model": {"name": "vit_test4", "img_size": 32}, "train": {"micro_batch": 4}}
    cfg.write_text(yaml.safe_dump(recipe))
    return cfg


@pytest.fixture
def fakebin(tmp_path: Path) -> Path:
    """Fake ``scontrol`` (hostnames, logged requeue), ``srun`` (runs its command once per node with
    SLURM_NODEID set) and ``vitscale`` (records its argv per node)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    _write_exe(bin_ / "scontrol", f"""#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\\n' {' '.join(HOSTS)}; exit 0; fi
echo "$*" >> "$FAKE_LOG/scontrol.log"
""")
    _write_exe(bin_ / "srun", """#!/bin/bash
echo "$*" > "$FAKE_LOG/srun.args"
while [[ $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
""")
    _write_exe(bin_ / "vitscale", """#!/bin/bash
echo "$*" > "$FAKE_LOG/node-$SLURM_NODEID.args"
""")
    return bin_


def _job(tmp_path: Path, vitscale: Path, nodes: int = 4, gpus: int = 8, **kw) -> slurm.SlurmJob:
    run_dir = tmp_path / "run"
    return slurm.SlurmJob(run_dir=run_dir, config_path=run_dir / "config.yaml", nodes=nodes,
                          gpus_per_node=gpus, vitscale=(str(vitscale),), workdir=tmp_path, **kw)


def _slurm_env(fakebin: Path, log: Path, nodes: int = 4, job_id: int = 4242) -> dict:
    log.mkdir(exist_ok=True)
    return {**os.environ, "PATH": f"{fakebin}:{os.environ['PATH']}", "FAKE_LOG": str(log),
            "SLURM_JOB_ID": str(job_id), "SLURM_NNODES": str(nodes), "SLURM_NODEID": "0",
            "SLURM_JOB_NODELIST": "gpu-a[17-18],gpu-b[01-02]"}


def test_slurm_cli_writes_script_and_resolved_config(tmp_path, recipe, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "h14"
    rc = cli.main(["slurm", "--config", str(recipe), "--nodes", "4", "--gpus-per-node", "8",
                   "--partition", "gpu", "--time", "48:00:00", "--cpus-per-task", "64",
                   "--extra-sbatch=--exclusive --constraint=h100", f"run.dir={run_dir}", "train.steps=77"])
    assert rc == 0
    script = run_dir / "launch.sbatch"
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    directives = re.findall(r"^#SBATCH (\S+)$", text, flags=re.M)
    for want in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64",
                 "--partition=gpu", "--time=48:00:00", "--requeue", "--signal=B:USR1@120",
                 f"--output={run_dir}/slurm/%j.log", "--exclusive", "--constraint=h100"):
        assert want in directives, want
    assert (run_dir / "slurm").is_dir()
    saved = load_config(run_dir / "config.yaml")
    assert saved.train.steps == 77 and saved.model.name == "vit_test4"
    assert f"--config {run_dir}/config.yaml" in text
    assert "sbatch" in capsys.readouterr().out


def test_slurm_dry_run_writes_nothing_and_checks_batch(tmp_path, recipe, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    assert cli.main(["slurm", "--config", str(recipe), "--nodes", "2", "--gpus-per-node", "4", "--dry-run",
                     f"run.dir={run_dir}"]) == 0
    assert "#SBATCH --nodes=2" in capsys.readouterr().out
    assert not run_dir.exists()
    with pytest.raises(UserError, match="global_batch"):
        cli.main(["slurm", "--config", str(recipe), "--nodes", "3", "--gpus-per-node", "8", "--dry-run",
                  "train.global_batch=64"])


def test_rendezvous_block_alone_with_fake_slurm(tmp_path, fakebin):
    text = slurm.sbatch_script(_job(tmp_path, fakebin / "vitscale", nodes=4, gpus=8))
    block = re.search(r"^# >>> rendezvous.*?^# <<< rendezvous$", text, flags=re.M | re.S).group(0)
    probe = tmp_path / "probe.sh"
    report = 'echo "$MASTER_ADDR $MASTER_PORT $NNODES $NODE_RANK $WORLD_SIZE"'
    probe.write_text(f"{block}\nrendezvous && {report}\n")
    for node in range(4):
        env = {**_slurm_env(fakebin, tmp_path / "log", job_id=1234567), "SLURM_NODEID": str(node)}
        out = subprocess.run(["bash", str(probe)], env=env, capture_output=True, text=True, check=True).stdout
        assert out.split() == ["gpu-a17", str(20000 + 1234567 % 10000), "4", str(node), "32"]


def test_script_runs_one_pretrain_per_node(tmp_path, fakebin):
    script = slurm.write_script(slurm.sbatch_script(_job(tmp_path, fakebin / "vitscale", nodes=4, gpus=8)),
                                tmp_path / "job.sbatch")
    log = tmp_path / "log"
    done = subprocess.run(["bash", str(script)], env=_slurm_env(fakebin, log, job_id=31), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    srun_args = (log / "srun.args").read_text()
    assert "--ntasks-per-node=1" in srun_args and "--nodes=4" in srun_args
    assert f"--output={tmp_path}/run/slurm/%j-%N.log" in srun_args
    for node in range(4):
        argv = (log / f"node-{node}.args").read_text().split()
        assert argv == ["pretrain", "--config", f"{tmp_path}/run/config.yaml", "--nnodes", "4",
                        "--node-rank", str(node), "--master-addr", "gpu-a17", "--master-port", "20031",
                        "--nproc-per-node", "8"]
    assert not (log / "scontrol.log").exists(), "a finished job must not requeue itself"


def test_usr1_is_forwarded_and_job_requeued_after_clean_exit(tmp_path, fakebin):
    _write_exe(fakebin / "srun", """#!/bin/bash
trap 'echo usr1 > "$FAKE_LOG/srun.signal"; exit 0' USR1
touch "$FAKE_LOG/srun.started"
while true; do sleep 0.05; done
""")
    script = slurm.write_script(slurm.sbatch_script(_job(tmp_path, fakebin / "vitscale", nodes=2, gpus=4)),
                                tmp_path / "job.sbatch")
    log = tmp_path / "log"
    proc = subprocess.Popen(["bash", str(script)], env=_slurm_env(fakebin, log, nodes=2, job_id=99),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not (log / "srun.started").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "srun never started"
            time.sleep(0.05)
        time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert (log / "srun.signal").read_text().strip() == "usr1"
    assert (log / "scontrol.log").read_text().split() == ["requeue", "99"]
    assert "requeueing job 99" in out


def test_submit_needs_sbatch_on_path(tmp_path, recipe, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(UserError, match="sbatch is not on PATH"):
        cli.main(["slurm", "--config", str(recipe), "--nodes", "1", "--gpus-per-node", "2", "--submit",
                  f"run.dir={tmp_path / 'run'}"])
    _write_exe(empty / "sbatch", '#!/bin/bash\necho "$1" > "${0%/*}/submitted"\n'
                                 'echo "Submitted batch job 7"\n')
    assert cli.main(["slurm", "--config", str(recipe), "--nodes", "1", "--gpus-per-node", "2", "--submit",
                     f"run.dir={tmp_path / 'run'}"]) == 0
    assert "Submitted batch job 7" in capsys.readouterr().out
    assert (empty / "submitted").read_text().strip() == str(tmp_path / "run" / "launch.sbatch")


def test_hostfile_parsing_and_errors():
    text = "# cluster A\nnode-1 slots=8\n\nnode-2   slots=8  # second\n"
    assert hostfile.parse_hostfile(text) == {"node-1": 8, "node-2": 8}
    with pytest.raises(UserError, match=r"line 3: 'node-3 8'"):
        hostfile.parse_hostfile("node-1 slots=8\nnode-2 slots=8\nnode-3 8\n")
    with pytest.raises(UserError, match="line 2: host 'node-1' is listed twice"):
        hostfile.parse_hostfile("node-1 slots=8\nnode-1 slots=4\n")
    with pytest.raises(UserError, match="line 1: .*slots=0"):
        hostfile.parse_hostfile("node-1 slots=0\n")
    with pytest.raises(UserError, match="no hosts"):
        hostfile.parse_hostfile("# empty\n")
    with pytest.raises(UserError, match="more than the hostfile offers on node-2"):
        hostfile.world_size({"node-1": 8, "node-2": 4}, gpus_per_node=8)
    assert hostfile.world_size({"node-1": 8, "node-2": 4}) == 12
    assert hostfile.world_size({"node-1": 8, "node-2": 8}, gpus_per_node=4) == 8


def test_bad_hostfile_through_the_vitscale_cli_is_a_clean_error(tmp_path, recipe, capsys):
    from pretrain.cli import main as vitscale

    hosts = tmp_path / "hosts"
    hosts.write_text("node-1 slots=8\nnode-2 slots = 8\n")
    argv = ["launch", "deepspeed", "--config", str(recipe), "--hostfile", str(hosts), "--dry-run"]
    assert vitscale(argv) == 2
    err = capsys.readouterr().err
    assert "line 2: 'node-2 slots = 8' is not 'HOST slots=N'" in err and "Traceback" not in err


def test_deepspeed_command_matches_the_launchers_parser(tmp_path):
    from deepspeed.launcher.runner import parse_args

    hosts = {"node-1": 8, "node-2": 8}
    cmd = hostfile.deepspeed_command("/h/hosts", hosts, ["/venv/bin/vitscale"], "/runs/x/config.yaml",
                                     master_port=29600)
    assert cmd == ["deepspeed", "--hostfile", "/h/hosts", "--master_addr", "node-1", "--master_port", "29600",
                   "--no_local_rank", "--no_python", "/venv/bin/vitscale", "pretrain", "--config",
                   "/runs/x/config.yaml"]
    args = parse_args(cmd[1:])
    assert args.no_python and args.no_local_rank and not args.module
    assert args.user_script == "/venv/bin/vitscale"
    assert args.user_args == ["pretrain", "--config", "/runs/x/config.yaml"]
    as_module = hostfile.deepspeed_command("h", {"n": 2}, [sys.executable, "-m", "pretrain"], "c.yaml",
                                           gpus_per_node=2)
    args = parse_args(as_module[1:])
    assert args.module and args.user_script == "pretrain" and args.num_gpus == 2 and args.no_ssh_check


@pytest.mark.slow
def test_deepspeed_launcher_runs_one_process_per_slot(tmp_path, recipe, monkeypatch, capsys):
    """The real DeepSpeed launcher on one host: every slot runs `vitscale pretrain --config ...`
    with the rank environment (a recording script stands in for vitscale)."""
    fake = _write_exe(tmp_path / "vitscale", '#!/bin/bash\necho "$RANK $LOCAL_RANK $WORLD_SIZE $*" '
                                             '> "$(dirname "$0")/rank-$RANK"\n')
    hosts = tmp_path / "hosts"
    hosts.write_text("# one box\nlocalhost slots=2\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "vitscale_command", lambda: [str(fake)])
    run_dir = tmp_path / "run"
    # The DeepSpeed launcher takes the port number up front (it has no "pick one" value), so it comes
    # from free_port(): another process could take it between that check and the use, an acceptable
    # race here since the recording script binds nothing and a fixed port would be shared by every run.
    port = str(free_port())
    rc = cli.main(["deepspeed", "--config", str(recipe), "--hostfile", str(hosts), "--master-port", port,
                   f"run.dir={run_dir}"])
    assert rc == 0
    for rank in (0, 1):
        got = (tmp_path / f"rank-{rank}").read_text().split()
        assert got == [str(rank), str(rank), "2", "pretrain", "--config", str(run_dir / "config.yaml")]
    assert load_config(run_dir / "config.yaml").run.dir == str(run_dir)




def test_accelerate_config_is_valid_for_accelerate(tmp_path, recipe, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    assert cli.main(["accelerate", "--config", str(recipe), "--nodes", "2", "--gpus-per-node", "8",
                     "--master-addr", "node-1", f"run.dir={run_dir}", "train.grad_accum=2"]) == 0
    acc = ClusterConfig.from_yaml_file(run_dir / "accelerate.yaml")
    assert acc.distributed_type.value == "DEEPSPEED"
    assert (acc.num_machines, acc.num_processes, acc.main_process_ip) == (2, 16, "node-1")
    ds = json.loads(Path(acc.deepspeed_config["deepspeed_config_file"]).read_text())
    assert ds["train_batch_size"] == 4 * 2 * 16
    assert ds["zero_optimization"]["stage"] == load_config(recipe).zero.stage


@pytest.mark.slow
def test_accelerate_launch_runs_vitscale_on_every_rank(tmp_path, recipe, monkeypatch):
    """`accelerate launch` with the generated config and command starts both ranks, meeting at
    the port accelerate picked (--master-port 0: no fixed port that two test runs could share)."""
    from accelerate.commands.config.config_args import ClusterConfig

    fake = _write_exe(tmp_path / "vitscale",
                      '#!/bin/bash\necho "$MASTER_PORT $RANK $WORLD_SIZE $*" > "$(dirname "$0")/r$RANK"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "vitscale_command", lambda: [str(fake)])
    run_dir = tmp_path / "run"
    assert cli.main(["accelerate", "--config", str(recipe), "--nodes", "1", "--gpus-per-node", "2",
                     "--master-port", "0", f"run.dir={run_dir}"]) == 0  # accelerate picks a free port
    assert ClusterConfig.from_yaml_file(run_dir / "accelerate.yaml").main_process_port == 0
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--config_file", str(run_dir / "accelerate.yaml"),
           "--no_python", str(fake), "pretrain", "--config", str(run_dir / "config.yaml")]
    if not Path(cmd[0]).is_file():
        cmd[0] = shutil.which("accelerate") or pytest.skip("accelerate CLI not installed")
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    ports = set()
    for rank in (0, 1):
        port, *got = (tmp_path / f"r{rank}").read_text().split()
        assert got == [str(rank), "2", "pretrain", "--config", str(run_dir / "config.yaml")]
        ports.add(int(port))
    assert len(ports) == 1 and 0 < ports.pop() < 65536
    with pytest.raises(UserError, match="--master-port 0: .*one node only"):
        cli.main(["accelerate", "--config", str(recipe), "--nodes", "2", "--gpus-per-node", "2",
                  "--master-port", "0", "--master-addr", "n1", "--dry-run", f"run.dir={run_dir}"])
