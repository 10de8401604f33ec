"""Which format a path holds, from names, small headers and metadata (no tensors loaded).

Rules, first match wins:

- directory with timm's Hub config.json (``architecture``, no
  ``model_type``) and its weights file                             -> ``timm``
- directory with config.json (with ``model_type``) and HF weights   -> ``hf``
- directory with ``zero/`` and ``*model_states.pt``, or whose
  ``latest_universal`` names one (and no ``latest``)               -> ``deepspeed-universal``
- tag directory (``*model_states.pt`` / vitscale.json), a
  checkpoints directory with ``latest``, or a run directory with
  ``checkpoints/latest``                                           -> ``deepspeed``
- ``*.npz``                                                         -> ``npz``
- ``*.safetensors`` with metadata ``format == "vitscale"``          -> ``safetensors``;
  ``model.safetensors`` beside timm's Hub config.json               -> ``timm``;
  ``model.safetensors`` beside a config.json                        -> ``hf``;
  HF key names (``encoder.layer.``)                                 -> ``hf`` (needs its config.json);
  otherwise                                                         -> ``timm``
- ``*.pth`` / ``*.pt`` / ``*.bin``                                  -> ``timm`` (``pytorch_model.bin``
  beside a config.json -> ``hf``)
"""

from __future__ import annotations

from pathlib import Path

from pretrain.checkpoint.layout import is_tag_dir, is_universal_dir
from pretrain.core.errors import UserError
from pretrain.formats.hf import is_hf_dir
from pretrain.formats.ours import FORMAT as OURS
from pretrain.formats.ours import read_header
from pretrain.formats.timm import hub_config, is_timm_hub_dir

FORMATS = ("safetensors", "deepspeed", "deepspeed-universal", "npz", "timm", "hf")


def _latest(d: Path, name: str) -> Path | None:
    f = d / name
    return d / f.read_text().strip() if f.is_file() else None


def detect_format(path: str | Path) -> str:
    """One of :data:`FORMATS` for ``path``; :class:`UserError` when it does not exist or is unknown."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist")
    if p.is_dir():
        if is_timm_hub_dir(p):
            return "timm"
        if is_hf_dir(p):
            return "hf"
        if is_universal_dir(p):
            return "deepspeed-universal"
        if is_tag_dir(p):
            return "deepspeed"
        for d in (p / "checkpoints", p):
            if (d / "latest").is_file():
                return "deepspeed"
            target = _latest(d, "latest_universal")
            if target is not None and is_universal_dir(target):
                return "deepspeed-universal"
        raise UserError(f"{p} is a directory vitscale does not recognise: expected a HF or timm Hub model "
                        f"(config.json + model.safetensors), a DeepSpeed run/checkpoints/tag directory (with "
                        f"'latest' or *model_states.pt) or a universal checkpoint (zero/ + *model_states.pt)")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix == ".safetensors":
        meta, info = read_header(p)
        if meta.get("format") == OURS:
            return "safetensors"
        if p.name == "model.safetensors" and hub_config(p.parent) is not None:
            return "timm"
        if p.name.startswith("model") and (p.parent / "config.json").is_file():
            return "hf"
        if any(".encoder.layer." in k or k.startswith("encoder.layer.") for k in info):
            raise UserError(f"{p} holds HF transformers ViT weights; pass the directory with its config.json")
        return "timm"
    if suffix in (".pth", ".pt", ".bin"):
        if p.name == "pytorch_model.bin" and (p.parent / "config.json").is_file() and hub_config(p.parent) is None:
            return "hf"
        return "timm"
    raise UserError(f"cannot tell the format of {p} from its name; pass --from with one of "
                    f"{', '.join(FORMATS)}")
