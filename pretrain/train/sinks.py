"""Where metrics records go: one list of sinks, fed by one call (``MetricsLog.write``).

``metrics.jsonl`` is always written (rank 0): one JSON object per record, the source every other
view is made from (``vitscale report`` reads it back with :func:`read_records`). The ``log``
section turns on the others, :data:`SINKS` (``log.tensorboard``, ``log.wandb``), which receive
the same scalars (:func:`scalars`): every number of every record, ``mfu`` and the lost-sample
counts by reason and shard included. A sink whose library is missing is refused before any
process starts (:func:`check_sink_package`, run by preflight) with one line naming the package.

A new sink is a class with ``write(record)`` and ``close(failed)``, ``package`` and ``extra``
(what ``pip install 'vitscale[extra]'`` adds), a ``log.<key>`` flag in the config, and one
entry in :data:`SINKS`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import multiprocessing
import secrets
import signal
import sys
from pathlib import Path

from pretrain.core.errors import UserError
from pretrain.core.files import write_atomic

METRICS_FILE = "metrics.jsonl"
_AXES = ("step", "time", "kind", "event")  # what places a record; not a scalar of it


def scalars(record: dict) -> dict[str, float]:
    """The numbers of one metrics record as flat tags, what TensorBoard and W&B receive.

    A tag is ``<kind>/<key>``, the kind being ``train`` for the step records, ``eval``,
    ``fewshot`` (``fewshot/<name>/<k>shot``) and ``event/<event name>`` for events
    (``event/checkpoint/blocked_s``); a dict of numbers goes one level deeper
    (``train/bad_by_reason/truncated_shard``). ``step`` and ``time`` are the axes, not tags; None
    (``mfu`` without a known peak), non-finite numbers, booleans, strings and lists are left out."""
    kind = record.get("kind", "train")
    prefix = f"event/{record.get('event', 'other')}" if kind == "event" else kind
    out: dict[str, float] = {}

    def add(tag: str, value) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[tag] = value

    for key, value in record.items():
        if key in _AXES:
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                add(f"{prefix}/{key}/{sub}", v)
        else:
            add(f"{prefix}/{key}", value)
    return out


def read_records(run_dir: Path) -> tuple[list[dict], int]:
    """The records of ``run_dir/metrics.jsonl`` in file order, and how many lines could not be
    read (a run killed mid-write leaves a partial last line; a copy may be cut anywhere). A
    missing file is no records."""
    try:
        lines = (Path(run_dir) / METRICS_FILE).read_text(errors="replace").splitlines()
    except OSError:
        return [], 0
    records, bad = [], 0
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += bool(line.strip())
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    return records, bad


class JsonlSink:
    """``run.dir/metrics.jsonl``: one strict-JSON object per record (NaN/Inf become null). A disk
    that fills up or turns read-only drops records with one warning; training goes on."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE
        self.warned = False

    def write(self, record: dict) -> None:
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(finite) + "\n")
        except OSError as err:  # a full or read-only disk must not stop training; the checkpoint says why
            if not self.warned:
                print(f"metrics: cannot append to {self.path}: {err.strerror or err}; records are dropped",
                      file=sys.stderr)
                self.warned = True

    def close(self, failed: bool = False) -> None:
        pass


class TensorBoardSink:
    """``log.tensorboard``: :func:`scalars` of every record under ``run.dir/tb``."""

    package, extra, module = "tensorboard", "tensorboard", "torch.utils.tensorboard"

    def __init__(self, run_dir: Path, log, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_package("tensorboard") from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def write(self, record: dict) -> None:
        for tag, value in scalars(record).items() if "step" in record else ():
            self.writer.add_scalar(tag, value, record["step"])

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbSink:
    """``log.wandb``: :func:`scalars` of every record to a Weights & Biases run, against ``step``.

    The run id is kept in ``run.dir/wandb_id``, so a resumed job continues the same W&B run
    (``resume="allow"``); steps run again after a resume are logged again, as in metrics.jsonl
    (the W&B charts use ``step`` as their x axis, not W&B's own row counter). W&B's files go
    under ``run.dir/wandb``; ``WANDB_MODE=offline`` keeps everything there (``wandb sync``
    uploads it later, one directory per job segment). W&B's console capture is off.

    W&B runs in a process of its own (started with ``spawn``, fed through a pipe): W&B keeps
    threads busy, and a rank that forks its data workers while another thread holds the
    interpreter's locks can hang the child (seen: an eval worker stuck after fork); the rank
    process then holds no W&B thread, and W&B's work stays off the training loop. If the rank
    dies, the pipe closes and the W&B process finishes the run as failed."""

    package, extra, module = "wandb", "wandb", "wandb"
    ID_FILE = "wandb_id"
    START_TIMEOUT_S = 300

    def __init__(self, run_dir: Path, log, config: dict):
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(6)  # W&B run ids: letters, digits, - and _
            write_atomic(id_file, run_id + "\n")
        init = {"project": log.wandb_project, "name": log.wandb_name or run_dir.resolve().name, "id": run_id,
                "resume": "allow", "dir": str(run_dir), "config": config}
        ctx = multiprocessing.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=_wandb_process, args=(theirs, init), name="vitscale-wandb")
        self.process.start()
        theirs.close()
        answer = self.conn.recv() if self.conn.poll(self.START_TIMEOUT_S) else "no answer"
        if answer != "ready":
            self.process.join(10)
            if answer == "missing":
                raise missing_package("wandb")
            raise UserError(f"log.wandb=true: W&B could not start run {run_id} ({answer}); log in with `wandb "
                            f"login`, set WANDB_MODE=offline to keep the run on this machine, or set log.wandb=false")
        self.warned = False

    def write(self, record: dict) -> None:
        values = scalars(record)
        if not values or "step" not in record:
            return
        try:
            self.conn.send({"step": record["step"], **values})
        except OSError as err:  # the W&B process died: training goes on, metrics.jsonl keeps everything
            if not self.warned:
                print(f"log.wandb: the W&B process is gone ({err}); records go to metrics.jsonl only",
                      file=sys.stderr)
                self.warned = True

    def close(self, failed: bool = False) -> None:
        with contextlib.suppress(OSError):  # the W&B process is gone already
            self.conn.send(1 if failed else 0)
        self.conn.close()
        self.process.join(120)
        if self.process.is_alive():
            self.process.terminate()


def _wandb_process(conn, init: dict) -> None:
    """The W&B run (:class:`WandbSink`): answers "ready" (or why not), logs every row it
    receives, and finishes with the exit code it is sent; the pipe closing means the rank died.
    Stop signals are the rank's to act on (SLURM sends them to every process of a job step; Ctrl-C
    reaches the whole process group): this process ends when the rank is done with it."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    try:
        import wandb
    except ImportError:
        conn.send("missing")
        return
    try:
        run = wandb.init(**init, settings=wandb.Settings(console="off", quiet=True))
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
    except Exception as err:  # any failure goes to the rank, which stops with it
        conn.send(f"{type(err).__name__}: {err}")
        return
    conn.send("ready")
    exit_code = 1
    while True:
        try:
            row = conn.recv()
        except (EOFError, OSError):
            break
        if isinstance(row, int):
            exit_code = row
            break
        run.log(row)
    run.finish(exit_code=exit_code)


# ``log.<key>: true`` turns a sink on; metrics.jsonl is always written
SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


def enabled_sinks(log) -> list[str]:
    """The keys of :data:`SINKS` the ``log`` config section turns on."""
    return [key for key in SINKS if getattr(log, key)]


def check_sink_package(key: str) -> None:
    """:func:`missing_package` when sink ``key``'s library cannot be imported in this process
    (preflight: the launcher imports it once; the ranks leave W&B to its own process)."""
    try:
        importlib.import_module(SINKS[key].module)
    except ImportError:
        raise missing_package(key) from None


def missing_package(key: str) -> UserError:
    """The one-line refusal of ``log.<key>=true`` without its library, naming the package."""
    sink = SINKS[key]
    return UserError(f"log.{key}=true needs the {sink.package} package, which is not installed: pip install "
                     f"'vitscale[{sink.extra}]' (or set log.{key}=false)")
