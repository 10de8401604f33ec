"""``vitscale finetune --config FILE --init SOURCE [key=value ...]``: the ViT paper's fine-tune stage.

The model of the config (new ``model.num_classes``, new ``model.img_size``, normally
``model.representation_size: null``) is built, then the weights of SOURCE go in through
:func:`pretrain.model.surgery.apply_finetune_surgery`: ``pre_logits.*`` and ``head.*`` dropped, one
zero-initialised Linear head, position embeddings resampled to the new grid. SOURCE is anything
:func:`pretrain.formats.read_weights` reads: a vitscale run or checkpoint directory (any ZeRO stage),
a consolidated safetensors file, a Google vit_jax / big_vision ``.npz``, a timm state dict or a
HuggingFace ViT directory, as it is. What the weights fix and the config leaves open comes from
SOURCE: without ``model.name`` the architecture (patch, width, depth, MLP, heads, pooling; keys the
config sets win), and whatever of the LayerNorm epsilon and the CLIP-tower parts (``pre_norm``,
``patch_bias``, ``act``, ``proj_dim``: an OpenCLIP source) the config does not set. These are added to the
overrides the ranks get, so they are recorded in the run's config and a relaunch derives the same.
Optimizer state is never carried over. Training then runs through the
same engine, loop, logging and resume as pretraining (relaunching resumes the fine-tune run; the
surgery result is then overwritten by the checkpoint).
"""

from __future__ import annotations

import sys

from pretrain.commands.pretrain import build_parser, launch_or_run
from pretrain.core.errors import UserError
from pretrain.train.config_file import apply_overrides, load_config, read_yaml

# the fields of the architecture the weights fix (img_size, num_classes, representation_size are the
# fine-tune's own choice)
_ARCH = ("patch_size", "width", "depth", "mlp_dim", "heads", "pool")
# what only the weights know (no variant name fixes them): from finetune.init unless the config sets them
_FROM_WEIGHTS = ("norm_eps", "pre_norm", "patch_bias", "act", "proj_dim")


def _source_spec(cfg, fmt: str, heads: int | None):
    """The spec of finetune.init (None when the file does not say its head count), from metadata
    where the format records it, else read from the tensors (npz, timm, HF)."""
    from pretrain.formats.inspect import inspect
    from pretrain.formats.state_dict import spec_from_dict

    spec = inspect(cfg.finetune.init, fmt, heads).get("spec")
    return spec_from_dict(spec, cfg.finetune.init) if spec else None


def _from_init(cfg, given: set[str], fmt: str) -> tuple[list[str], object]:
    """(overrides that give the model what the init weights fix and the config leaves open, the
    init's spec or None). Without ``model.name`` the architecture (``_ARCH``, each key the config
    does not set) is the weights'; so is each of ``_FROM_WEIGHTS`` the config does not set (the
    LayerNorm epsilon always, the CLIP-tower fields where they are not their defaults)."""
    import json

    from pretrain.model.vit import ViTSpec, variant_of

    need_arch = "name" not in given and any(k not in given for k in _ARCH)
    if not need_arch and all(k in given for k in _FROM_WEIGHTS):
        return [], None
    src = _source_spec(cfg, fmt, cfg.model.heads if "heads" in given else None)
    if src is None:
        if need_arch:
            raise UserError(f"finetune.init {cfg.finetune.init} ({fmt}) does not record its number of attention "
                            f"heads and its width is no known variant's, so its architecture cannot be read from it "
                            f"alone: set model.heads=N (the other dimensions are then read from the weights), or "
                            f"model.name with the variant it is")
        return [], None
    out = []
    if need_arch:
        name = variant_of(src.width, src.depth, src.mlp_dim, src.patch_size, src.heads)
        out += [f"model.name={name}"] if name else []
        out += [f"model.{k}={getattr(src, k)}" for k in _ARCH if k not in given]
    if "norm_eps" not in given:
        out.append(f"model.norm_eps={src.norm_eps!r}")
    default = ViTSpec()
    out += [f"model.{k}={json.dumps(getattr(src, k))}" for k in _FROM_WEIGHTS[1:]
            if k not in given and getattr(src, k) != getattr(default, k)]
    return out, src


def _precheck(cfg, src) -> None:
    """Run the surgery on the meta device from the source's spec, so a mismatched backbone fails
    here, before any process is spawned, with the key that does not fit."""
    from pretrain.model.surgery import finetune_state_dict
    from pretrain.model.vit import build_model

    source = build_model(src, device="meta").state_dict()
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
    from pretrain.formats.registry import detect_format, weights_format
    from pretrain.model.vit import DEFAULT_NORM_EPS
    from pretrain.train.spawn import in_launched_job

    fmt = detect_format(cfg.finetune.init)
    if cfg.finetune.init_weights == "ema" and weights_format(fmt).read_ema is None:
        raise UserError(f"finetune.init_weights=ema needs a vitscale training checkpoint as --init; "
                        f"{cfg.finetune.init} is {fmt!r}, which holds one set of weights: drop finetune.init_weights")
    given = set(apply_overrides(read_yaml(args.config) if args.config else {}, overrides).get("model") or {})
    derived, src = _from_init(cfg, given, fmt)
    if derived:
        cfg = load_config(args.config, overrides + derived)
        argv = list(argv) + derived  # the ranks get them as given: nothing to read again
        shown = [d for d in derived if d != f"model.norm_eps={DEFAULT_NORM_EPS!r}"]
        if shown and not in_launched_job():
            print(f"model from {cfg.finetune.init} ({fmt}): {' '.join(shown)}")
    if src is not None and not in_launched_job():
        _precheck(cfg, src)

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

        return run_worker(cfg, "finetune", args.resume, args.no_resume, prepare_model=prepare,
                          recipe=args.config)

    return launch_or_run("finetune", argv, args, cfg, worker)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
