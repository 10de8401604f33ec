"""A job whose ranks import neither DeepSpeed nor torch: the launcher's own behaviour on signals and
failures (``pretrain.train.spawn``), in about a second of CPU a job instead of ten.

``python -m tests.scripts.light_job RUN_DIR [MODE]`` is the launcher: ``spawn`` with 2 local ranks,
exactly as ``vitscale pretrain`` starts its ranks (torch's elastic agent in a thread, the signal
supervisor, the error folder, the parent-death binding). Each rank re-enters this module, binds to
the launcher and takes a "step" every 20 ms, writing ``RUN_DIR/rankR.json`` (pid, step, saves).
A stop request (SIGUSR1, what the launcher turns SIGTERM / SIGUSR1 / Ctrl-C into) makes it "save"
once and exit 0, like a trainer that saves after its step. MODE:

- ``slowsave``: the save takes 60 s (time for a second Ctrl-C);
- ``usererror``: rank 1 stops at step 3 with a user error (reported to the launcher, exit 2);
- ``crash``: rank 1 raises at step 3 (a bug: its traceback, exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from pretrain.train.spawn import bind_to_launcher, exit_rank, report_rank_error, spawn


def _rank(run: Path, mode: str) -> None:
    bind_to_launcher()
    rank = int(os.environ["RANK"])
    state = {"pid": os.getpid(), "step": 0, "saves": 0, "stop_requests": 0}
    signal.signal(signal.SIGUSR1, lambda *_: state.update(stop_requests=state["stop_requests"] + 1))

    def write() -> None:
        tmp = run / f".rank{rank}.json"
        tmp.write_text(json.dumps(state))
        tmp.replace(run / f"rank{rank}.json")

    while True:
        state["step"] += 1
        write()
        if rank == 1 and state["step"] == 3 and mode == "usererror":
            report_rank_error("rank 1 found data.train unreadable (a test's user error)", False)
            exit_rank(2)
        if rank == 1 and state["step"] == 3 and mode == "crash":
            raise RuntimeError("a bug in rank 1")
        if state["stop_requests"]:
            time.sleep(60 if mode == "slowsave" else 0)
            state["saves"] += 1
            write()
            exit_rank(0)
        time.sleep(0.02)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("mode", nargs="?", default="")
    args = p.parse_args(sys.argv[2:] if os.environ.get("RANK") else sys.argv[1:])
    if os.environ.get("RANK"):
        _rank(args.run, args.mode)
    args.run.mkdir(parents=True, exist_ok=True)
    launch = argparse.Namespace(nproc_per_node=2, nnodes=1, node_rank=0, master_addr="127.0.0.1", master_port=None)
    return spawn(launch, "light", [str(args.run), args.mode], module="tests.scripts.light_job")


if __name__ == "__main__":
    sys.exit(main())
