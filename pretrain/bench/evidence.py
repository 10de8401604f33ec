"""What a benchmark saw besides the time: which SDPA kernel ran (from the profiler's op and kernel
names, cross-checked with the dispatcher) and what torch.compile did (graphs, recompiles)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from pretrain.model.sdpa import sdpa_report
from pretrain.model.vit import ViTSpec

# Profiler op names of torch's SDPA backends; the first match wins (cuDNN kernels also say "flash").
_SDPA_OPS = (
    ("cudnn", "_scaled_dot_product_cudnn_attention"),
    ("flash", "_scaled_dot_product_flash_attention"),
    ("efficient", "_scaled_dot_product_efficient_attention"),
    ("math", "_scaled_dot_product_attention_math"),
    ("overrideable", "_scaled_dot_product_fused_attention_overrideable"),
)
# Device kernel names, used when no SDPA op was recorded (lower case substrings).
_SDPA_KERNELS = (
    ("cudnn", ("cudnn",)),
    ("flash", ("flash_fwd", "flash_bwd", "flash::", "flash_attn")),
    ("efficient", ("fmha", "mem_eff", "efficient_attention", "attentionkernel")),
)


def sdpa_from_profile(names: Iterable[str], device_type: str) -> tuple[str | None, list[str]]:
    """Which SDPA backend ran, from profiler event names: the aten op of each backend if one was
    recorded, otherwise the device kernel names (flash / cuDNN / memory-efficient). Returns the
    backend named as :mod:`pretrain.model.sdpa` names them (``"flash"`` on CUDA, ``"cpu-flash"``
    on CPU; ``"a+b"`` if several ran) or None if no SDPA op or kernel was seen, and the evidence."""
    names = sorted(set(names))
    found: dict[str, list[str]] = {}
    for name in names:
        for backend, op in _SDPA_OPS:
            if op in name:
                found.setdefault(backend, []).append(name)
                break
    if not found:
        for name in names:
            low = name.lower()
            for backend, keys in _SDPA_KERNELS:
                if any(k in low for k in keys):
                    found.setdefault(backend, []).append(name)
                    break
    if not found:
        return None, []
    prefix = "" if device_type == "cuda" else f"{device_type}-"
    backend = "+".join(prefix + b for b in sorted(found))
    evidence = [n[:120] for hits in found.values() for n in hits[:3]]
    return backend, evidence


def _kernel_evidence(names: Iterable[str]) -> list[str]:
    keys = [k for _, ks in _SDPA_KERNELS for k in ks]
    return sorted({n[:120] for n in names if any(k in n.lower() for k in keys)})[:4]


def sdpa_summary(spec: ViTSpec, micro_batch: int, names: set[str], dev: torch.device) -> tuple[str, dict]:
    """The backend to report (profiled if seen, else the dispatcher's answer) and the evidence:
    ``{"dispatcher", "profiled", "agree", "evidence", "rejected"}``; ``rejected`` maps each
    backend the dispatcher tried before the one that ran to its reasons."""
    report = sdpa_report(micro_batch, spec.heads, spec.seq_len, spec.head_dim, torch.bfloat16, dev, 0.0)
    profiled, evidence = sdpa_from_profile(names, dev.type)
    evidence += [k for k in _kernel_evidence(names) if k not in evidence]
    check = {"dispatcher": report.backend, "profiled": profiled, "agree": profiled in (None, report.backend),
             "evidence": evidence, "rejected": report.rejected}
    return profiled or report.backend, check


@dataclass
class CompileStats:
    """What torch.compile did during a measurement: graphs compiled, graph breaks, and the
    functions that hit dynamo's recompile limit (those then run eagerly, so the figures are
    partly eager; DeepSpeed's ZeRO-3 module hooks do this)."""

    graphs: int = 0
    graph_breaks: int = 0
    recompile_limit_hits: list[str] = field(default_factory=list)


class _RecompileLimitLog(logging.Handler):
    def __init__(self, stats: CompileStats):
        super().__init__(logging.WARNING)
        self.stats = stats

    def emit(self, record: logging.LogRecord) -> None:
        lines = record.getMessage().splitlines()
        if lines and "hit config." in lines[0]:
            where = lines[1].strip().removeprefix("function: ") if len(lines) > 1 else lines[0]
            if where not in self.stats.recompile_limit_hits:
                self.stats.recompile_limit_hits.append(where[:160])


@contextlib.contextmanager
def compile_watch() -> Iterator[CompileStats]:
    """Count dynamo's graphs, graph breaks and recompile-limit hits inside the block."""
    from torch._dynamo.utils import counters

    counters.clear()
    stats = CompileStats()
    handler = _RecompileLimitLog(stats)
    logger = logging.getLogger("torch._dynamo.convert_frame")
    logger.addHandler(handler)
    try:
        yield stats
    finally:
        logger.removeHandler(handler)
        stats.graphs = int(counters["stats"]["unique_graphs"])
        stats.graph_breaks = int(sum(counters["graph_break"].values()))
