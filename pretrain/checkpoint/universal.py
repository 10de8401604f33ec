"""DeepSpeed universal checkpoints: the conversion a resume on another world size needs.

What ``deepspeed.checkpoint.ds_to_universal`` (DeepSpeed 0.19.8) produces from a tag dir:
``OUT/zero/<param name>/{fp32,exp_avg,exp_avg_sq}.pt`` (full, unpartitioned tensors; flat 1-D for
ZeRO-3 sources, a ``{"param": tensor}`` dict for ZeRO-1/2 sources), ``OUT/zero/optimizer_state.pt``
and the ``*model_states.pt`` files copied. ZeRO-1/2 checkpoints of a plain model carry no
``universal_checkpoint_info``; the tool refuses them unless ``--inject_missing_state`` is passed,
so we always pass it. To resume from it with any world size: DeepSpeed config
``"checkpoint": {"load_universal": true}`` and ``engine.load_checkpoint(dirname(OUT), tag)``.
We copy ``vitscale.json`` into ``OUT`` with the universal format name and ``universal_from``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from pretrain.checkpoint.layout import META, UNIVERSAL, UNIVERSAL_FORMAT, CheckpointManager, is_universal_dir, read_meta
from pretrain.core.errors import UserError
from pretrain.core.files import write_atomic


def to_universal(tag_dir: str | Path, out_dir: str | Path) -> dict:
    """Convert the ZeRO checkpoint ``tag_dir`` to a universal one in ``out_dir`` (which must not
    exist): DeepSpeed's converter in a subprocess (its default 4 extract / 2 merge workers, fewer
    on smaller machines), then ``out_dir/vitscale.json``, whose contents are returned."""
    cpus = os.cpu_count() or 1
    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out_dir), "--inject_missing_state",
           "--num_extract_workers", str(min(4, cpus)), "--num_merge_workers", str(min(2, cpus))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not is_universal_dir(out_dir):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        shutil.rmtree(out_dir / "tmp", ignore_errors=True)
        raise UserError(f"DeepSpeed's ds_to_universal failed on {tag_dir} (exit {proc.returncode}):\n{tail}")
    meta = read_meta(tag_dir) or {}
    meta.pop("files", None)
    meta.update(format=UNIVERSAL_FORMAT, universal_from=tag_dir.name)
    (out_dir / META).write_text(json.dumps(meta, indent=1))
    return meta

def universal_for(ckpt: CheckpointManager, tag_dir: Path) -> Path:
    """The universal checkpoint of ``tag_dir``, converted by rank 0 into
    ``checkpoints/universal/<tag>`` if not there yet while the other ranks wait (the wait is
    bounded by ``run.timeout_s``). Every rank gets the path or the same :class:`UserError`."""
    tag_dir = Path(tag_dir)
    out = ckpt.dir / UNIVERSAL / tag_dir.name
    error = None
    if ckpt.rank == 0 and (read_meta(out) or {}).get("universal_source") != str(tag_dir.resolve()):
        try:
            _convert_to_universal(tag_dir, out)
        except UserError as err:
            error = str(err)
    error = ckpt.comm.broadcast_object(error)
    if error is not None:
        raise UserError(error)
    return out


def _convert_to_universal(tag_dir: Path, out: Path) -> None:
    """DeepSpeed's converter into ``.tmp-<tag>`` beside ``out``, then one rename. Preemption
    signals are held back meanwhile (the converter's processes would die of them) and handled
    once it is done."""
    tmp = out.with_name(f".tmp-{out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    held = {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        meta = to_universal(tag_dir, tmp)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    write_atomic(tmp / META, json.dumps({**meta, "universal_source": str(tag_dir.resolve())}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    write_atomic(out.parent / "latest_universal", out.name)
