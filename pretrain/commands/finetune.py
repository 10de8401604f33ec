"""``vitscale finetune --config FILE --init SOURCE [key=value ...]``: the ViT paper's fine-tune stage.

The model of the config (new ``model.num_classes``, new ``model.img_size``, normally
``model.representation_size: null``) is built, then the weights of SOURCE go in through
:func:`pretrain.model.surgery.apply_finetune_surgery`: ``pre_logits.*`` and ``head.*`` dropped, one
zero-initialised Linear head, position embeddings resampled to the new grid. SOURCE is anything
:func:`pretrain.formats.read_weights` reads: a vitscale run or checkpoint directory (any ZeRO stage),
a consolidated safetensors file, a Google vit_jax / big_vision ``.npz``, a timm state dict or a
HuggingFace ViT directory. Optimizer state is never carried over. Training then runs through the
same engine, loop, logging and resume as pretraining (relaunching resumes the fine-tune run; the
surgery result is then overwritten by the checkpoint).
"""

from __future__ import annotations

import sys

from pretrain.commands.pretrain import build_parser, launch_or_run
from pretrain.core.errors import UserError
from pretrain.train.config_file import load_config

_CHEAP_SPEC_FORMATS = ("safetensors", "deepspeed", "deepspeed-universal")


def _precheck(cfg, fmt: str) -> None:
    """Run the surgery on the meta device from the source's recorded spec, so a mismatched
    backbone fails here, before any process is spawned, with the key that does not fit."""
    from pretrain.formats.inspect import inspect
    from pretrain.formats.state_dict import spec_from_dict
    from pretrain.model.surgery import finetune_state_dict
    from pretrain.model.vit import build_model

    spec = inspect(cfg.finetune.init, fmt).get("spec")
    if not spec:
        return
    source = build_model(spec_from_dict(spec, cfg.finetune.init), device="meta").state_dict()
    finetune_state_dict(source, cfg.model.spec(), keep_pre_logits=cfg.finetune.keep_pre_logits,
                        mode=cfg.finetune.pos_embed_mode)


def main(argv: list[str]) -> int:
    p = build_parser("vitscale finetune", "Fine-tune a pretrained ViT at a new resolution with a new head.")
    p.add_argument("--init", metavar="SOURCE", help="weights to start from (sets finetune.init)")
    args = p.parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([f"finetune.init={args.init}"] if args.init else [])
    cfg = load_config(args.config, overrides)
    if not cfg.finetune.init:
        raise UserError("finetune needs weights to start from: pass --init SOURCE (a run dir, checkpoint, "
                        ".safetensors, .npz, timm file or HF directory)")
    from pretrain.formats import detect_format

    fmt = detect_format(cfg.finetune.init)
    if cfg.finetune.init_weights == "ema" and fmt != "deepspeed":
        raise UserError(f"finetune.init_weights=ema needs a vitscale training checkpoint as --init; "
                        f"{cfg.finetune.init} is {fmt!r}, which holds one set of weights: drop finetune.init_weights")
    if fmt in _CHEAP_SPEC_FORMATS:
        _precheck(cfg, fmt)

    def prepare(model, log) -> None:
        from pretrain.formats import read_weights
        from pretrain.model.surgery import apply_finetune_surgery

        sd, _, _ = read_weights(cfg.finetune.init, fmt, ema=cfg.finetune.init_weights == "ema")
        report = apply_finetune_surgery(model, sd, keep_pre_logits=cfg.finetune.keep_pre_logits,
                                        mode=cfg.finetune.pos_embed_mode)
        weights = " EMA weights" if cfg.finetune.init_weights == "ema" else ""
        log.console(f"initialised from{weights} {cfg.finetune.init} ({fmt})\n{report.format()}")
        log.write({"kind": "event", "event": "finetune_init", "source": cfg.finetune.init, "format": fmt,
                   "dropped": report.dropped, "new": report.new,
                   "resampled": {k: [list(a), list(b)] for k, (a, b) in report.resampled.items()}})

    def worker() -> int:
        from pretrain.train.worker import run_worker

        return run_worker(cfg, "finetune", args.resume, args.no_resume, prepare_model=prepare)

    return launch_or_run("finetune", argv, args, cfg, worker)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
