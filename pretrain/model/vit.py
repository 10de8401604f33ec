"""Plain single-device Vision Transformer (ViT paper / vit_jax layout), no DeepSpeed.

State-dict keys are the contract that conversion and fine-tuning rely on::

    cls_token (1, 1, D)            pos_embed (1, P + N, D)   P = 1 with a class token, else 0
    patch_embed.proj.{weight,bias} Conv2d(3, D, p, p); no bias when patch_bias is False
    norm_pre.{weight,bias}         LayerNorm on the embedded tokens, only when pre_norm is set
    blocks.{i}.norm1 / attn.qkv (fused, rows q|k|v) / attn.proj / norm2 / mlp.fc1 / mlp.fc2
    norm.{weight,bias}             final LayerNorm
    proj.weight                    Linear(D, E, bias=False) on the pooled token, only when proj_dim is set
    pre_logits.{weight,bias}       Linear(E or D, R) + tanh, only when representation_size is set
    head.{weight,bias}             Linear(R or E or D, num_classes), absent when num_classes == 0

The defaults are the ViT paper's model. ``pre_norm``, ``patch_bias=False``, ``act="quick_gelu"``
and ``proj_dim`` describe CLIP image towers (OpenAI CLIP, OpenCLIP: a LayerNorm before the blocks,
a bias-free patch embedding, QuickGELU in OpenAI's weights, the output projection to the joint
embedding); at their defaults the model, its state dict and its spec's ``to_dict()`` are what they
were before these fields existed.

Randomness: in training, dropout, attention dropout (inside SDPA), drop path and patch dropout draw
from torch's default generators (the CPU's and the input device's), the only ones SDPA's dropout
and ``nn.Dropout`` can use. :func:`seeded_noise` makes those draws a pure function of a seed; the
training loop runs every micro batch's forward inside it (see :mod:`pretrain.train.loop`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# name -> (width, depth, mlp_dim, heads); the patch size is the number after the letter.
_SIZES = {
    "ti": (192, 12, 768, 3),
    "s": (384, 12, 1536, 6),
    "b": (768, 12, 3072, 12),
    "l": (1024, 24, 4096, 16),
    "h": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    # tiny sizes that train in seconds on a CPU (tests, demo)
    "test": (64, 2, 128, 4),
    "micro": (32, 2, 64, 2),
}


DEFAULT_NORM_EPS = 1e-6  # LayerNorm epsilon of vit_jax, big_vision and timm
ACTIVATIONS = ("gelu", "quick_gelu")  # exact GELU (the ViT paper); x * sigmoid(1.702 x) (OpenAI CLIP)
# fields added for CLIP towers: to_dict() leaves them out at their defaults, so the specs of every
# other model (and the files that record them) read as before, also by older versions
_CLIP_FIELDS = {"pre_norm": False, "patch_bias": True, "act": "gelu", "proj_dim": None}


@dataclass(frozen=True)
class ViTSpec:
    """The architecture: every number that fixes a ViT's parameters and compute, nothing else.

    ``norm_eps`` and ``act`` fix no parameter but belong to the weights: a model trained with
    LayerNorm epsilon 1e-12 (HF transformers' default) computes other outputs with 1e-6, one
    trained with QuickGELU others with GELU, so both are carried from the weights a model is built
    from, through every format that can record them.

    How a model trains (dropout, initial head bias, activation checkpointing, compilation) is
    chosen when it is built or run (``VisionTransformer(spec, dropout=...)``,
    ``set_grad_checkpointing``), so a checkpoint loads whatever those were."""

    img_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    heads: int = 12
    num_classes: int = 1000
    representation_size: int | None = None
    pool: str = "cls"  # "cls" (class token) or "gap" (global average pool, no class token)
    norm_eps: float = DEFAULT_NORM_EPS  # every LayerNorm's epsilon (HF transformers' default is 1e-12)
    pre_norm: bool = False  # LayerNorm on the embedded tokens before the blocks (CLIP's ln_pre)
    patch_bias: bool = True  # the patch embedding has a bias (CLIP's has none)
    act: str = "gelu"  # MLP activation: "gelu" (exact) or "quick_gelu" (OpenAI CLIP weights)
    proj_dim: int | None = None  # bias-free Linear(D, proj_dim) on the pooled token (CLIP's proj)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.img_size // self.patch_size, self.img_size // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.pool == "cls" else 0

    @property
    def seq_len(self) -> int:
        gh, gw = self.grid
        return gh * gw + self.num_prefix_tokens

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def feature_dim(self) -> int:
        """Width of the pooled feature the pre-logits layer or the head reads: ``proj_dim`` or D."""
        return self.proj_dim or self.width

    def to_dict(self) -> dict:
        """Every field, except the CLIP-tower fields that hold their defaults (see the module
        docstring): :func:`ViTSpec(**d)` rebuilds the same spec."""
        return {k: v for k, v in asdict(self).items() if k not in _CLIP_FIELDS or v != _CLIP_FIELDS[k]}


def variant_names() -> list[str]:
    """Names accepted by :func:`spec_for`, e.g. ``vit_h14``, ``vit_b16``, ``vit_test4``."""
    patches = {"test": (4, 8), "micro": (4, 8)}
    return [f"vit_{s}{p}" for s in _SIZES for p in patches.get(s, (8, 14, 16, 32))]


def spec_for(name: str, **overrides) -> ViTSpec:
    """Spec of the named variant (``vit_<size><patch>``), with fields overridden where not None.

    ``representation_size="auto"`` gives the pre-logits layer of width D (the ViT paper's
    pretraining head); None gives a single linear head.
    """
    key = name.lower().removeprefix("vit_").replace("/", "")
    size = key.rstrip("0123456789")
    patch = key[len(size):]
    if size not in _SIZES or not patch:
        raise ValueError(
            f"unknown model name {name!r}: use vit_<size><patch> with size one of "
            f"{', '.join(_SIZES)} (e.g. vit_h14, vit_b16, vit_test4)"
        )
    width, depth, mlp_dim, heads = _SIZES[size]
    spec = ViTSpec(patch_size=int(patch), width=width, depth=depth, mlp_dim=mlp_dim, heads=heads)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("representation_size") == "auto":
        overrides["representation_size"] = overrides.get("width", width)
    return replace(spec, **overrides)


def variant_of(width: int, depth: int, mlp_dim: int, patch_size: int, heads: int | None = None) -> str | None:
    """The name :func:`spec_for` knows for these dimensions (``vit_s16``), or None when no variant
    has them (``heads`` None: not compared)."""
    for size, (w, d, m, h) in _SIZES.items():
        if (w, d, m) == (width, depth, mlp_dim) and heads in (None, h):
            return f"vit_{size}{patch_size}"
    return None


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) V in plain torch: the oracle that SDPA is tested against."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return scores.float().softmax(dim=-1).to(q.dtype) @ v


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, attn_dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, use_sdpa: bool = True) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        if use_sdpa:
            p = self.attn_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            y = reference_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


_ACT = {"gelu": F.gelu, "quick_gelu": quick_gelu}


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int, dropout: float, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.drop = nn.Dropout(dropout)
        self.act = _ACT[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def kept_tokens(num_patches: int, rate: float) -> int:
    """Patch tokens an image keeps under patch dropout ``rate`` (at least one)."""
    return max(1, round(num_patches * (1.0 - rate)))


def keep_random_tokens(x: torch.Tensor, rate: float) -> torch.Tensor:
    """A random subset of :func:`kept_tokens` of the (B, N, D) patch tokens, drawn per image."""
    keep = kept_tokens(x.shape[1], rate)
    idx = torch.rand(x.shape[0], x.shape[1], device=x.device).argsort(dim=1)[:, :keep]  # (B, K)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: in training, each sample's residual branch is dropped with probability
    ``rate`` and kept ones are scaled by 1 / (1 - rate), so the expectation is unchanged."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
    return x * mask.div_(keep)


@contextlib.contextmanager
def seeded_noise(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Inside: the default generators of the CPU and of ``device`` (a CUDA device) start from
    ``seed``, so every random draw of a forward (dropout, attention dropout, drop path, patch
    dropout) is a pure function of ``seed`` and the inputs. On exit both generators are back where
    they were: the draws neither depend on nor disturb what else uses them. Activation
    checkpointing recomputes a block with the generator state it stashed in the forward, i.e. this
    one, so a recomputed block draws the same masks."""
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); each residual branch
    dropped per sample with probability ``drop_path`` in training."""

    def __init__(self, spec: ViTSpec, dropout: float = 0.0, attn_dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        self.attn = Attention(spec.width, spec.heads, attn_dropout)
        self.norm2 = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        self.mlp = Mlp(spec.width, spec.mlp_dim, dropout, spec.act)
        self.drop = nn.Dropout(dropout)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, use_sdpa: bool = True) -> torch.Tensor:
        x = x + drop_path(self.drop(self.attn(self.norm1(x), use_sdpa)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class VisionTransformer(nn.Module):
    """ViT as in Dosovitskiy et al.; ``forward = forward_head(forward_features(x))``.

    ``dropout`` / ``attn_dropout`` act in training mode only, as does ``drop_path`` (stochastic
    depth; block i of L drops with rate ``drop_path * i / (L - 1)``, rising linearly as in DeiT and
    timm); ``patch_dropout`` (FLIP) keeps a random (1 - rate) share of the patch tokens of each
    image in training (the class token always; evaluation sees every patch), cutting the work per
    image about in proportion; ``head_bias_init`` is the head's initial bias (-10 for the JFT
    sigmoid setup). None of them changes the parameters, so they are not part of ``spec``."""

    def __init__(self, spec: ViTSpec, dropout: float = 0.0, attn_dropout: float = 0.0, head_bias_init: float = 0.0,
                 drop_path: float = 0.0, patch_dropout: float = 0.0):
        super().__init__()
        if spec.img_size % spec.patch_size:
            raise ValueError(f"img_size {spec.img_size} is not divisible by patch {spec.patch_size}")
        if spec.width % spec.heads:
            raise ValueError(f"width {spec.width} is not divisible by heads {spec.heads}")
        if spec.act not in ACTIVATIONS:
            raise ValueError(f"activation {spec.act!r} is not one of {', '.join(ACTIVATIONS)}")
        self.spec = spec
        self.head_bias_init = head_bias_init
        self.patch_dropout = patch_dropout
        self.patch_embed = PatchEmbed(spec.patch_size, spec.width, spec.patch_bias)
        if spec.pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.seq_len, spec.width))
        self.pos_drop = nn.Dropout(dropout)
        if spec.pre_norm:
            self.norm_pre = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        rates = torch.linspace(0, drop_path, spec.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(spec, dropout, attn_dropout, rate) for rate in rates)
        self.checkpointed = [False] * spec.depth
        self.norm = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        if spec.proj_dim:
            self.proj = nn.Linear(spec.width, spec.proj_dim, bias=False)
        self._build_head(spec.num_classes, spec.representation_size)
        self.init_weights()

    def _build_head(self, num_classes: int, representation_size: int | None) -> None:
        self.pre_logits = nn.Linear(self.spec.feature_dim, representation_size) if representation_size else None
        d = representation_size or self.spec.feature_dim
        self.head = nn.Linear(d, num_classes) if num_classes > 0 else None

    @torch.no_grad()
    def init_weights(self) -> None:
        """vit_jax init: xavier-uniform linears, lecun-normal patch embed, normal(0.02)
        position embeddings, zero class token, zero head weights with ``head_bias_init``."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=1e-6)
        for blk in self.blocks:
            nn.init.zeros_(blk.attn.qkv.bias)
            nn.init.zeros_(blk.attn.proj.bias)
        w = self.patch_embed.proj.weight
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.pre_logits is not None:
            nn.init.zeros_(self.pre_logits.bias)
        self._init_head()

    @torch.no_grad()
    def _init_head(self) -> None:
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.constant_(self.head.bias, self.head_bias_init)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (besides every bias and norm)."""
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: torch.Tensor, use_sdpa: bool = True) -> torch.Tensor:
        """Images (B, 3, H, W) -> normed tokens (B, T, D), class token first."""
        x = self.patch_embed(x)  # (B, N, D)
        x = x + self.pos_embed[:, self.spec.num_prefix_tokens:]
        if self.training and self.patch_dropout:
            x = keep_random_tokens(x, self.patch_dropout)  # (B, K, D)
        if self.spec.pool == "cls":
            cls = self.cls_token + self.pos_embed[:, :1]
            x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x)
        if self.spec.pre_norm:
            x = self.norm_pre(x)
        for blk, recompute in zip(self.blocks, self.checkpointed, strict=True):
            recompute = recompute and self.training
            x = checkpoint(blk, x, use_sdpa, use_reentrant=False) if recompute else blk(x, use_sdpa)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, T, D) -> logits (B, classes); ``pre_logits=True`` stops before ``head``
        (with ``proj_dim`` and no pre-logits layer: CLIP's image embedding, unnormalised)."""
        x = x[:, 0] if self.spec.pool == "cls" else x.mean(dim=1)
        if self.spec.proj_dim:
            x = self.proj(x)
        if self.pre_logits is not None:
            x = torch.tanh(self.pre_logits(x))
        if pre_logits or self.head is None:
            return x
        return self.head(x)

    def forward(self, x: torch.Tensor, use_sdpa: bool = True, pre_logits: bool = False) -> torch.Tensor:
        """Logits (B, classes); ``pre_logits=True``: the representation before ``head`` instead
        (few-shot features). A keyword here, not a call of ``forward_head``, so that an engine
        that gathers partitioned parameters around the top-level forward (ZeRO-3) serves both."""
        return self.forward_head(self.forward_features(x, use_sdpa), pre_logits)

    def set_grad_checkpointing(self, enable: bool | float = True) -> None:
        """Recompute blocks' activations in the backward pass instead of keeping them (training
        only; ``model.act_ckpt``): True for every block, False for none, a fraction f in (0, 1]
        for round(f x depth) blocks spread evenly over the depth (block i when
        floor((i + 1) f) > floor(i f)), which trades memory for recompute in between."""
        f = 1.0 if enable is True else 0.0 if enable is False else float(enable)
        self.checkpointed = [math.floor((i + 1) * f + 1e-9) > math.floor(i * f + 1e-9) for i in range(len(self.blocks))]

    @property
    def grad_checkpointing(self) -> bool:
        return any(self.checkpointed)

    def compile_blocks(self) -> None:
        """``torch.compile`` every transformer block in place (the ``model.compile`` option):
        blocks are identical, so one compiled graph serves them all and the engine still sees
        plain parameters."""
        for blk in self.blocks:
            blk.compile()


def build_model(spec: ViTSpec, device: torch.device | str | None = None, **options) -> VisionTransformer:
    """Build on ``device`` (``"meta"`` allocates nothing); ``options`` are VisionTransformer's
    run-time keywords (dropout, attn_dropout, head_bias_init, drop_path, patch_dropout)."""
    with torch.device(device or "cpu"):
        return VisionTransformer(spec, **options)
