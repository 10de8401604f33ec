"""The checks that run before any process starts: config, batch arithmetic, data, run dir,
disk, attention backend, logging sinks, and with ``model.fp8`` whether FP8 can run.

``vitscale pretrain`` / ``finetune`` run them in the launching process and stop with one line per
failure (exit 2) before spawning ranks; ``vitscale preflight`` prints them as a table (adding the
memory estimate and an all-reduce inside a job, see ``launch/preflight.py``); ``vitscale launch``
runs them for the cluster it writes a launch for. Each check is a :class:`Check` with a status
and, for WARN / FAIL, the fix. With synthetic data they take milliseconds; shard sets are
resolved exactly as the loaders resolve them (:func:`pretrain.data.shard_sets.resolve_shards`).

``runs_here``: whether this machine runs the ranks (``vitscale pretrain``) or a cluster does
(``preflight`` / ``launch`` on a login node): a login node without a GPU cannot tell whether
FlashAttention will run there, so it checks the documented constraints instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pretrain.checkpoint.layout import checkpoint_bytes
from pretrain.core.errors import UserError
from pretrain.core.system import gpu_compute_capability
from pretrain.data.config import unread_settings
from pretrain.data.loader import check_labels, plan_streams, train_shard_sets
from pretrain.data.shard_sets import ShardSet, check_same_classes, probe_shards, resolve_shards
from pretrain.model.costs import param_count
from pretrain.model.fp8 import MIN_CAPABILITY, fp8_blocker, torchao_blocker
from pretrain.model.sdpa import SdpaReport, flash_blockers, sdpa_report
from pretrain.train.config import Config
from pretrain.train.fewshot import check_width, feature_width, resolve_dataset
from pretrain.train.sinks import check_sink_package, enabled_sinks

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
GIB = 1 << 30


@dataclass
class Check:
    """One line of the report. ``fix`` says what to change when the status is WARN or FAIL."""

    name: str
    status: str
    detail: str
    fix: str = ""
    data: dict = field(default_factory=dict)


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def describe_config(cfg: Config) -> Check:
    spec = cfg.model.spec()
    fp8 = f", FP8 {cfg.model.fp8}" if cfg.model.fp8 != "off" else ""
    return Check("config", PASS,
                 f"{cfg.model.label()} {spec.img_size}px: {param_count(spec) / 1e6:.1f}M params, {spec.seq_len} "
                 f"tokens, head_dim {spec.head_dim}; ZeRO-{cfg.zero.stage}, {cfg.optim.name}, "
                 f"{'bf16' if cfg.train.bf16 else 'fp32'}{fp8}")


def check_batch(cfg: Config, world_size: int) -> Check:
    """Global batch = micro batch x accumulation x world size; the accumulation derived from
    ``train.global_batch`` when not given."""
    try:
        return Check("batch", PASS, cfg.batch_line(world_size) + ("" if cfg.train.global_batch else
                                                                  " (train.global_batch not set)"))
    except UserError as err:
        return Check("batch", FAIL, str(err), "change train.micro_batch, train.global_batch or the number of GPUs")


def check_data(cfg: Config, world_size: int) -> list[Check]:
    """``data.train`` (every source of a mixture) and ``data.val`` resolve (as the loaders resolve
    them), their first samples are readable with labels that fit the model, the mixture's sources
    share one class table, and the global sample stream fits the layout (``data.streams``)."""
    spec = cfg.loader()
    checks = []
    unread = check_unread_settings(cfg)
    if cfg.data.train == "synthetic":
        checks.append(unread if unread is not None and unread.name == "data.train" else
                      Check("data.train", SKIP, "synthetic data: no shards to check"))
        train = None
    else:
        train, check = _check_train(cfg, spec, world_size)
        checks.append(check)
    key, source = "data.val", cfg.data.val
    if not source:
        checks.append(Check(key, SKIP, "not set: no evaluation"))
    elif source == "synthetic":
        checks.append(unread if unread is not None and unread.name == key else
                      Check(key, SKIP, "synthetic data: no shards to check"))
    else:
        try:
            shards = resolve_shards(source, "val", key=key, samples_per_epoch=cfg.data.samples_per_epoch)
            check_labels(shards, spec, key)
            probe_shards(shards, key, multi_label=cfg.data.multi_label, label_key=cfg.data.label_key)
            if train is not None:
                check_same_classes(train, shards, "data.train", key)
            count = f"{shards.samples} samples" if shards.samples is not None else "samples unknown"
            checks.append(Check(key, PASS, "; ".join([f"{len(shards.urls)} shards, {count}", *shards.notes]),
                                data={"shards": len(shards.urls)}))
        except UserError as err:
            checks.append(Check(key, FAIL, str(err)))  # the message names the key and the fix
    return checks + check_fewshot(cfg)


def _check_train(cfg: Config, spec, world_size: int) -> tuple[ShardSet | None, Check]:
    """The training sources and their streams: (the first source's shards, the check)."""
    try:
        sources = train_shard_sets(spec)
        for name, _, shards in sources:
            key = "data.train" if len(sources) == 1 else f"data.train source {name}"
            probe_shards(shards, key, multi_label=cfg.data.multi_label, label_key=cfg.data.label_key)
            check_same_classes(sources[0][2], shards, f"data.train source {sources[0][0]}", key)
        plan = plan_streams(sources, cfg.for_world(world_size).loader(), world_size)
    except UserError as err:
        return None, Check("data.train", FAIL, str(err))  # the message names the key and the fix
    weights = plan.weights()
    parts = []
    for name, _, shards in sources:
        count = f"{shards.samples} samples" if shards.samples is not None and not shards.estimated \
            else "samples unknown"
        share = f" ({100 * weights[name]:.1f}% of every batch)" if len(sources) > 1 else ""
        parts.append("; ".join([f"{name + ': ' if len(sources) > 1 else ''}{len(shards.urls)} shards, {count}{share}",
                                *shards.notes]))
    detail = " | ".join(parts) + (f"; {plan.count} streams of {plan.rows} samples a step, "
                                  f"{plan.count // world_size} per rank (data.streams)")
    return sources[0][2], Check("data.train", PASS, detail,
                                data={"shards": sum(len(s.urls) for _, _, s in sources)})


def check_unread_settings(cfg: Config) -> Check | None:
    """A FAIL when a synthetic source would silently ignore settings only shard pipelines read
    (RandAugment, crops, flips, workers, ...; :func:`pretrain.data.config.unread_settings`),
    named after that source; None when there are none."""
    readers = {split for split, source in (("train", cfg.data.train), ("val", cfg.data.val)) if source != "synthetic"}
    if cfg.fewshot.datasets:
        readers.add("fewshot")
    unread = unread_settings(cfg.data, cfg.augment, readers)
    if not unread:
        return None
    key = "data.train" if cfg.data.train == "synthetic" else "data.val"
    return Check(key, FAIL, f"{key}=synthetic reads none of {', '.join(unread)} (synthetic images are made in the "
                            f"rank process, never cropped, flipped or augmented): drop "
                            f"{'it' if len(unread) == 1 else 'them'}, or point {key} at shards (`vitscale shards "
                            f"synth DIR` + `vitscale shards write DIR SHARDS` write a tiny set of the same task)")


def check_fewshot(cfg: Config) -> list[Check]:
    """Every ``fewshot.datasets`` entry resolves, is single-label with labels, and (when its index
    says how many classes it has) has no more classes than the model's features can separate.
    Per-class counts need a label scan; the ranks do it at start-up (step 0)."""
    checks = []
    width = feature_width(cfg.model.spec())
    for ds in cfg.fewshot.datasets:
        name = f"fewshot.{ds.name}"
        try:
            train, val = resolve_dataset(ds)
            classes = max(train.num_classes or 0, val.num_classes or 0)
            if classes:
                check_width(ds.name, classes, width)
        except UserError as err:
            checks.append(Check(name, FAIL, str(err), "point the dataset at your shard set, or turn few-shot "
                                                      "evaluation off with fewshot.datasets=[]"))
            continue
        sides = [f"{side} {len(s.urls)} shards, {s.samples if s.samples is not None else 'unknown'} images"
                 for side, s in (("train", train), ("val", val))]
        what = f"{classes} classes" if classes else "classes counted at start-up"
        checks.append(Check(name, PASS, "; ".join([*sides, f"{what}, {width}-d features", *train.notes, *val.notes])))
    return checks


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _bytes_under(path: Path, max_files: int = 20000) -> int:
    """Bytes of the regular files under ``path``, counting at most ``max_files`` files (an
    undercount only makes the disk check stricter; it keeps a mistaken run.dir=/ cheap)."""
    if not path.is_dir():
        return 0
    total = 0
    for count, f in enumerate(path.rglob("*")):
        if count >= max_files:
            break
        if f.is_file() and not f.is_symlink():
            total += f.stat().st_size
    return total


def check_run_dir(cfg: Config) -> list[Check]:
    """``run.dir`` (and its checkpoints folder, when it exists) can be written: a temporary file
    is created and removed, nothing else; and its file system has room for ``checkpoint.keep + 1``
    checkpoints (bytes already under ``run.dir`` count as available, since old checkpoints are
    rotated out as new ones land; one new checkpoint must always fit)."""
    run_dir = Path(cfg.run.dir)
    fix = "set run.dir to a writable directory on a shared filesystem"
    if run_dir.exists() and not run_dir.is_dir():
        return [Check("run dir", FAIL, f"run.dir={str(run_dir)!r} is a file, not a directory", fix)]
    base = _existing_ancestor(run_dir)
    if not base.is_dir():
        return [Check("run dir", FAIL, f"run.dir={str(run_dir)!r} cannot be created: {base} is not a directory", fix)]
    for where in (base, run_dir / "checkpoints"):
        if not where.is_dir():
            continue
        try:
            with tempfile.NamedTemporaryFile(dir=where, prefix=".vitscale-preflight-"):
                pass
        except OSError as err:
            return [Check("run dir", FAIL, f"run.dir={str(run_dir)!r}: cannot write in {where} ({err.strerror})",
                          f"{fix}, or fix the permissions of {where}")]
    state = "exists" if base == run_dir.absolute() else f"will be created under {base}"
    checks = [Check("run dir", PASS, f"{run_dir} {state}, writable")]
    params = param_count(cfg.model.spec())
    one = checkpoint_bytes(params, cfg.optim.name)
    total = one * (cfg.checkpoint.keep + 1)
    existing = _bytes_under(run_dir)
    need = max(one, total - existing)
    free = shutil.disk_usage(base).free
    detail = (f"{gib(free)} free; {cfg.checkpoint.keep} + 1 checkpoints x {gib(one)} "
              f"({one // params} B/param) = {gib(total)}"
              + (f", {gib(existing)} already in run.dir" if existing else ""))
    if free < need:
        checks.append(Check("disk", FAIL, detail, f"free {gib(need - free)} more, lower checkpoint.keep, or {fix}"))
    else:
        checks.append(Check("disk", PASS, detail))
    return checks


def sdpa_shapes(cfg: Config) -> dict:
    spec = cfg.model.spec()
    return {"batch": cfg.train.micro_batch, "heads": spec.heads, "seq_len": spec.seq_len,
            "head_dim": spec.head_dim, "dtype": torch.bfloat16 if cfg.train.bf16 else torch.float32,
            "dropout_p": cfg.model.attn_dropout}


def local_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` with CUDA (so ranks do not all touch GPU 0), else CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def check_sdpa(cfg: Config, runs_here: bool, probe_gpu: bool = True, device: str | None = None) -> Check:
    """The SDPA backend for the configured shapes on ``device`` (default: this rank's).
    ``probe_gpu=False`` on a CUDA device checks the documented constraints without touching the
    GPU (a launcher must not hold a CUDA context for the whole run)."""
    shapes = sdpa_shapes(cfg)
    dev = torch.device(device) if device is not None else local_device()
    kind = str(shapes["dtype"]).removeprefix("torch.")
    what = f"heads {shapes['heads']}, seq {shapes['seq_len']}, head_dim {shapes['head_dim']}, {kind} on {dev.type}"
    if dev.type == "cuda" and not probe_gpu:
        report = SdpaReport(backend="not probed")
        what += ": not probed in this launcher process, which must not hold a GPU context"
    else:
        report = sdpa_report(**shapes, device=dev)
        what += f": {report.backend}"
    if report.backend == "flash":
        return Check("sdpa", PASS, what)
    gpu_blockers = [r for r in flash_blockers(shapes["head_dim"], shapes["dtype"], "cpu")
                    if not r.startswith("device is")]
    on_gpu = dev.type == "cuda" and report.backend != "not probed"
    reasons = flash_blockers(shapes["head_dim"], shapes["dtype"], dev) if on_gpu else list(gpu_blockers)
    reasons += report.rejected.get("flash", []) if on_gpu else []
    fix = "; ".join(dict.fromkeys(reasons)) or "see the reason above"
    if cfg.model.require_flash:
        if on_gpu or gpu_blockers:
            return Check("sdpa", FAIL, f"{what}, but model.require_flash=true",
                         f"{fix}; or set model.require_flash=false")
        if runs_here and dev.type != "cuda":
            return Check("sdpa", FAIL, f"{what}, but model.require_flash=true and this machine has no GPU",
                         "run on sm80+ GPUs (A100, H100), or set model.require_flash=false")
    if not on_gpu:
        note = ("these shapes are flash-eligible on an sm80+ GPU" if not gpu_blockers
                else "flash will not run on a GPU either: " + "; ".join(gpu_blockers))
        where = "no GPU here; " if dev.type != "cuda" else ""
        return Check("sdpa", WARN if gpu_blockers else PASS, f"{what} ({where}{note})", fix if gpu_blockers else "")
    return Check("sdpa", WARN, f"{what}: expected flash on Ampere/Hopper in bf16", fix)


def check_log_sinks(cfg: Config) -> list[Check]:
    """Every sink the ``log`` section turns on (``log.tensorboard``, ``log.wandb``) can import its
    library here; a FAIL names the package to install."""
    checks = []
    for key in enabled_sinks(cfg.log):
        try:
            check_sink_package(key)
        except UserError as err:
            checks.append(Check(f"log.{key}", FAIL, str(err)))
            continue
        checks.append(Check(f"log.{key}", PASS, "installed"))
    return checks


def check_fp8(cfg: Config, runs_here: bool, probe_gpu: bool = True, device: str | None = None,
              capability: tuple[int, int] | None = None) -> Check:
    """Whether ``model.fp8`` can train where the ranks run (:func:`pretrain.model.fp8.fp8_blocker`):
    on a GPU its compute capability (``capability``; else from the device when ``probe_gpu``, or
    from ``nvidia-smi`` in a launcher that must not touch the GPU), on this CPU (``runs_here``) an
    emulated FP8 layer; a login node without a GPU (not ``runs_here``) can only check torchao."""
    recipe = cfg.model.fp8
    dev = torch.device(device) if device is not None else local_device()
    off = "set model.fp8=off (bf16 matmuls)"
    need = f"compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (L40S, RTX 4090, H100, H200, B200)"
    if dev.type == "cuda":
        cap = capability or (torch.cuda.get_device_capability(dev) if probe_gpu else
                             gpu_compute_capability(dev.index or 0))
        if cap is None:
            return Check("model.fp8", WARN, f"FP8 {recipe}: nvidia-smi did not say this GPU's compute capability; "
                                            f"the ranks check it at start-up ({need})")
        blocker = fp8_blocker(dev, cap, recipe)
        where = f"GPU compute capability {cap[0]}.{cap[1]}"
    elif runs_here:
        blocker = fp8_blocker("cpu", recipe=recipe)
        where = "emulated on the CPU (real FP8 casts, fp32 GEMMs: numerics, not speed)"
    else:
        blocker = torchao_blocker()
        where = f"no GPU here; the cluster's GPUs need {need}"
    if blocker is not None:
        return Check("model.fp8", FAIL, f"FP8 {recipe} cannot train here: {blocker}", off)
    return Check("model.fp8", PASS, f"FP8 {recipe} in the blocks' Linear layers (torchao): {where}")


def run_cheap_checks(cfg: Config, world_size: int, runs_here: bool, probe_gpu: bool | None = None) -> list[Check]:
    """Config, batch arithmetic, data, run dir (+ disk), logging sinks, SDPA backend, and FP8 when
    ``model.fp8`` is on.

    ``probe_gpu``: whether the SDPA and FP8 checks may touch this rank's GPU; by default only
    inside a rank (``LOCAL_RANK`` set), never in a launcher process that spawns ranks."""
    probe = ("LOCAL_RANK" in os.environ) if probe_gpu is None else probe_gpu
    fp8 = [check_fp8(cfg, runs_here, probe)] if cfg.model.fp8 != "off" else []
    return [describe_config(cfg), check_batch(cfg, world_size), *check_data(cfg, world_size), *check_run_dir(cfg),
            *check_log_sinks(cfg), check_sdpa(cfg, runs_here, probe), *fp8]


def raise_on_failure(checks: list[Check]) -> None:
    """One :class:`UserError` listing every FAIL with its fix; nothing if none failed."""
    failed = [c for c in checks if c.status == FAIL]
    if len(failed) == 1 and (failed[0].name in ("batch", "data.train", "data.val") or
                             failed[0].name.startswith(("fewshot.", "log."))):
        raise UserError(failed[0].detail)  # these details already name the key and the fix
    if failed:
        # a detail that names its key already is not prefixed with it again
        lines = [("" if c.detail.startswith(c.name) else f"{c.name}: ") + c.detail
                 + (f" -> fix: {c.fix}" if c.fix else "") for c in failed]
        raise UserError("preflight failed: " + " | ".join(lines))


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<5} {c.name:<{width}}  {c.detail}")
        if c.fix and c.status in (WARN, FAIL):
            lines.append(f"{'':<5} {'':<{width}}  fix: {c.fix}")
    return "\n".join(lines)
