"""EMA of the fp32 master weights, sharded exactly like them under ZeRO-1/2/3.

Every rank keeps an EMA copy of *its own* partition of the fp32 master weights (DeepSpeed's flat
fp32 group partitions), so the EMA costs one more fp32 partition per rank, never a full copy.
After every applied optimizer step (not after a skipped, non-finite one) each partition is
updated in place: ``ema = d * ema + (1 - d) * master``. The decay is ``ema.decay``, or with
``ema.warmup`` timm's warm-up ``d_n = min(decay, 1 - (1 + n) ** (-2/3))`` for the n-th update,
so early averages do not hold on to the random initialisation.

A checkpoint holds each rank's partitions and a fragment table: for every piece of a parameter
this rank holds, (parameter name, start and length in the flattened parameter, group, offset in
the group's partition). The same world size restores the partitions as they are. Another world
size (a resume through DeepSpeed's universal checkpoint) rebuilds each new partition from the
old ranks' fragments, piece by piece, reading the old files memory-mapped: nothing is averaged or
re-initialised, so the EMA continues exactly. The same table lets :func:`consolidate_ema` build
the full EMA state dict offline (:func:`pretrain.checkpoint.sharded.assemble`: ``vitscale convert
--ema``, ``evaluate --ema``, ``finetune.init_weights=ema``).

Evaluating the EMA weights swaps them into the model's bf16 weights (ZeRO-3: each rank's
parameter partitions; ZeRO-1/2: each rank's fragments, summed over ranks into the full
replicated tensors) and back from the fp32 master weights afterwards, which reproduces the bf16
weights DeepSpeed had derived from them.
"""

from __future__ import annotations

import torch

from pretrain.checkpoint.sharded import Fragment, reshard
from pretrain.core.errors import UserError


def ema_decay(decay: float, warmup: bool, updates: int) -> float:
    """The decay of the ``updates``-th update (1-based)."""
    return min(decay, 1.0 - (1.0 + updates) ** (-2.0 / 3.0)) if warmup else decay


class MasterPartitions:
    """This rank's fp32 master partitions of a DeepSpeed ZeRO-1/2/3 engine, their fragment table,
    and how to write values into the model's bf16 weights."""

    def __init__(self, engine):
        ds, opt = engine.engine, engine.engine.optimizer
        self.names, self.opt = ds.param_names, opt
        self.rank = torch.distributed.get_rank()
        self.stage = 3 if hasattr(opt, "fp32_partitioned_groups_flat") else 1
        if self.stage == 3:  # DeepSpeedZeroOptimizer_Stage3
            self.flats = list(opt.fp32_partitioned_groups_flat)
            self.params = [list(g) for g in opt.fp16_groups]
        elif hasattr(opt, "single_partition_of_fp32_groups"):  # DeepSpeedZeroOptimizer (ZeRO-1/2)
            self.flats = list(opt.single_partition_of_fp32_groups)
            self.params = [list(g) for g in opt.bit16_groups]
        elif hasattr(opt, "fp32_groups_flat_partition"):  # BF16_Optimizer (ZeRO-1 with fp32 grad accumulation)
            self.flats = list(opt.fp32_groups_flat_partition)
            self.params = [list(g) for g in opt.bf16_groups]
        else:
            raise UserError("ema.decay needs zero.stage 1, 2 or 3 in bf16 (the EMA is sharded like DeepSpeed's fp32 "
                            "master weights); set zero.stage=1")
        self.table = self._fragments()

    def _fragments(self) -> list[Fragment]:
        out = []
        for g, params in enumerate(self.params):
            offset = 0
            for p in params:
                if self.stage == 3:
                    size = p.partition_numel()
                    start = self.rank * size
                    numel = max(0, min(size, p.ds_numel - start))
                    if numel:
                        out.append(Fragment(self.names[p], start, numel, g, offset))
                    offset += size
                elif getattr(p, "_hp_mapping", None) is not None:
                    m = p._hp_mapping
                    out.append(Fragment(self.names[p], m.lp_fragment_address.start, m.lp_fragment_address.numel,
                                        g, m.hp_fragment_address.start))
        return out

    def shapes(self) -> dict[str, list[int]]:
        return {self.names[p]: list(p.ds_shape if self.stage == 3 else p.shape) for ps in self.params for p in ps}

    @torch.no_grad()
    def write_model(self, flats: list[torch.Tensor]) -> None:
        """Make the model's bf16 weights ``flats`` (partitions shaped like the masters')."""
        if self.stage == 3:
            for g, params in enumerate(self.params):
                offset = 0
                for p in params:
                    size = p.partition_numel()
                    p.ds_tensor.data.copy_(flats[g].narrow(0, offset, size))
                    offset += size
            persistent = self.opt.persistent_parameters  # kept whole on every rank: release, gather anew
            if persistent:
                persistent[0].partition(persistent)
                persistent[0].all_gather(persistent)
            return
        mine: dict[str, list[Fragment]] = {}
        for f in self.table:
            mine.setdefault(f.name, []).append(f)
        for p in (p for ps in self.params for p in ps):
            full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            for f in mine.get(self.names[p], []):
                full.narrow(0, f.start, f.numel).copy_(flats[f.group].narrow(0, f.offset, f.numel))
            torch.distributed.all_reduce(full)  # every fragment lives on exactly one rank
            p.data.copy_(full.view_as(p))


class Ema:
    """The EMA component of the trainer (state_dict / load_state_dict, per rank)."""

    placement = "sharded"  # like the fp32 master partitions; another world size goes through reshard

    def __init__(self, engine, decay: float, warmup: bool):
        self.masters = MasterPartitions(engine)
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        self.flats = [f.detach().clone() for f in self.masters.flats]

    @torch.no_grad()
    def update(self) -> None:
        """After an applied optimizer step."""
        self.updates += 1
        d = ema_decay(self.decay, self.warmup, self.updates)
        torch._foreach_lerp_(self.flats, [f.detach() for f in self.masters.flats], 1.0 - d)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "flats": [f.cpu() for f in self.flats],
                "table": [vars(f) for f in self.masters.table], "shapes": self.masters.shapes()}

    def load_state_dict(self, state: dict) -> None:
        if [Fragment(**f) for f in state["table"]] != self.masters.table:
            raise UserError("the checkpoint's EMA partitions do not match this run's layout (same world size, other "
                            "parameter grouping): resume with the config the run was started with")
        self.updates = int(state["updates"])
        for mine, saved in zip(self.flats, state["flats"], strict=True):
            mine.copy_(saved)

    def reshard(self, old_states: list[dict]) -> None:
        """Rebuild this rank's partitions from every old rank's saved state (another world size)."""
        reshard(old_states, self.masters.table, self.flats)
        self.updates = int(old_states[0]["updates"])

    def reset(self) -> None:
        """Start the average at the current master weights."""
        self.updates = 0
        for ema, master in zip(self.flats, self.masters.flats, strict=True):
            ema.copy_(master.detach())

    def load_default(self) -> str:
        """A checkpoint without an EMA (its run had ``ema.decay=0``): start at the restored weights."""
        self.reset()
        return "the EMA starts at the restored weights"

    def swap_in(self) -> None:
        """The model's bf16 weights become the EMA's (for evaluation); :meth:`swap_out` undoes it."""
        self.masters.write_model(self.flats)

    def swap_out(self) -> None:
        self.masters.write_model(self.masters.flats)
