"""Checkpoint conversion: exact round trips for every format, parity with the libraries' own
models (transformers), Google .npz layouts built here from their documented keys, and the
errors a user gets for wrong inputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pretrain import cli
from pretrain.commands import convert
from pretrain.core.errors import UserError
from pretrain.formats import REGISTRY, detect_format, load_safetensors, read_weights, save_safetensors
from pretrain.formats.inspect import inspect
from pretrain.formats.npz import write_vit_jax_npz
from pretrain.model.vit import VisionTransformer, build_model, spec_for

PLAIN = spec_for("vit_test4", img_size=16, num_classes=5)
REP = spec_for("vit_test4", img_size=16, num_classes=5, representation_size="auto")
GAP = replace(PLAIN, pool="gap")
X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def random_model(spec, seed: int = 0) -> VisionTransformer:
    """Every weight random (the default init zeroes the head, which would hide mistakes)."""
    torch.manual_seed(seed)
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model.eval()


def logits(sd, spec) -> torch.Tensor:
    model = build_model(spec)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    with torch.no_grad():
        return model.eval()(X)


def assert_same_weights(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def write_ours(tmp_path: Path, spec, seed: int = 0) -> tuple[Path, dict]:
    sd = random_model(spec, seed).state_dict()
    path = tmp_path / "ours.safetensors"
    save_safetensors(sd, spec, path, {"step": 7})
    return path, sd


# ---------------------------------------------------------------- round trips ours -> X -> ours

TARGETS = [("safetensors", "out.safetensors"), ("npz", "out.npz"), ("timm", "out.pth"),
           ("timm", "out.safetensors"), ("hf", "out_hf")]


@pytest.mark.parametrize("to,name", TARGETS)
@pytest.mark.parametrize("spec", [PLAIN, REP, GAP], ids=["plain", "pre_logits", "gap"])
def test_round_trip_is_exact(tmp_path, spec, to, name):
    src, sd = write_ours(tmp_path, spec)
    dst = tmp_path / name
    argv = [str(src), str(dst), "--to", to, "--verify"]
    if (to == "timm" and spec.representation_size) or (to == "hf" and spec.pool == "gap"):
        with pytest.raises(UserError, match="pre-logits|class token"):
            convert.main(argv)
        assert not dst.exists()
        return
    assert convert.main(argv) == 0
    back, back_spec, meta = read_weights(dst)
    assert meta["format"] == ("safetensors" if to == "safetensors" else to)
    assert back_spec == spec
    assert_same_weights(sd, back)


def test_timm_drop_head_writes_the_backbone(tmp_path):
    src, sd = write_ours(tmp_path, REP)
    dst = tmp_path / "backbone.pth"
    assert convert.main([str(src), str(dst), "--to", "timm", "--drop-head", "--verify"]) == 0
    back, spec, _ = read_weights(dst)
    assert spec == replace(REP, num_classes=0, representation_size=None)
    assert_same_weights({k: v for k, v in sd.items() if not k.startswith(("head.", "pre_logits."))}, back)


def test_old_timm_pre_logits_and_wrapped_checkpoints_read(tmp_path):
    sd = random_model(REP).state_dict()
    timm_sd = {("pre_logits.fc." + k.split(".", 1)[1] if k.startswith("pre_logits.") else k): v
               for k, v in sd.items()}
    torch.save({"model": {f"module.{k}": v for k, v in timm_sd.items()}}, tmp_path / "old.pth")
    back, spec, _ = read_weights(tmp_path / "old.pth")
    assert spec == REP
    assert_same_weights(sd, back)


def test_bf16_output(tmp_path):
    src, sd = write_ours(tmp_path, PLAIN)
    dst = tmp_path / "bf16.safetensors"
    assert convert.main([str(src), str(dst), "--to", "safetensors", "--dtype", "bf16", "--verify"]) == 0
    back, _, meta = load_safetensors(dst)
    assert {v.dtype for v in back.values()} == {torch.bfloat16}
    assert_same_weights({k: v.to(torch.bfloat16) for k, v in sd.items()}, back)
    assert meta["step"] == 7 and meta["source_format"] == "safetensors"


# ---------------------------------------------------------------- Google .npz layouts


def _n(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def _block_arrays(sd: dict, o: str, spec, names: tuple[str, str, str, str]) -> dict[str, np.ndarray]:
    """One encoder block in the Flax layout; ``names`` = (attention, first LayerNorm, second
    LayerNorm, MLP) module names, which differ between vit_jax and big_vision."""
    mha, ln1, ln2, mlp = names
    D, H = spec.width, spec.heads
    blk = {}
    q, k, v = _n(sd[o + "attn.qkv.weight"]).reshape(3, D, D)
    qb, kb, vb = _n(sd[o + "attn.qkv.bias"]).reshape(3, D)
    for name, w, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
        blk[f"{mha}/{name}/kernel"] = w.T.reshape(D, H, D // H)
        blk[f"{mha}/{name}/bias"] = bias.reshape(H, D // H)
    blk[f"{mha}/out/kernel"] = _n(sd[o + "attn.proj.weight"]).T.reshape(H, D // H, D)
    blk[f"{mha}/out/bias"] = _n(sd[o + "attn.proj.bias"])
    for ln, ours in ((ln1, "norm1"), (ln2, "norm2")):
        blk[f"{ln}/scale"] = _n(sd[o + ours + ".weight"])
        blk[f"{ln}/bias"] = _n(sd[o + ours + ".bias"])
    for j, fc in enumerate(("fc1", "fc2")):
        blk[f"{mlp}/Dense_{j}/kernel"] = _n(sd[o + f"mlp.{fc}.weight"]).T
        blk[f"{mlp}/Dense_{j}/bias"] = _n(sd[o + f"mlp.{fc}.bias"])
    return blk


def vit_jax_arrays(sd: dict, spec) -> dict[str, np.ndarray]:
    """The vit_jax layout, written out key by key from google-research/vision_transformer."""
    a = {"embedding/kernel": _n(sd["patch_embed.proj.weight"]).transpose(2, 3, 1, 0),
         "embedding/bias": _n(sd["patch_embed.proj.bias"]), "cls": _n(sd["cls_token"]),
         "Transformer/posembed_input/pos_embedding": _n(sd["pos_embed"]),
         "Transformer/encoder_norm/scale": _n(sd["norm.weight"]),
         "Transformer/encoder_norm/bias": _n(sd["norm.bias"]),
         "head/kernel": _n(sd["head.weight"]).T, "head/bias": _n(sd["head.bias"])}
    if "pre_logits.weight" in sd:
        a["pre_logits/kernel"] = _n(sd["pre_logits.weight"]).T
        a["pre_logits/bias"] = _n(sd["pre_logits.bias"])
    for i in range(spec.depth):
        blk = _block_arrays(sd, f"blocks.{i}.", spec, ("MultiHeadDotProductAttention_1", "LayerNorm_0",
                                                         "LayerNorm_2", "MlpBlock_3"))
        a.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in blk.items()})
    return a


def big_vision_arrays(sd: dict, spec, prefix: str, scanned: bool, bf16: bool) -> dict[str, np.ndarray]:
    """big_vision models/vit.py: pos_embedding without class slot, *_0/*_1 names, optional scan."""
    jax = vit_jax_arrays(sd, spec) if spec.pool == "cls" else None
    a = {"embedding/kernel": _n(sd["patch_embed.proj.weight"]).transpose(2, 3, 1, 0),
         "embedding/bias": _n(sd["patch_embed.proj.bias"]),
         "Transformer/encoder_norm/scale": _n(sd["norm.weight"]),
         "Transformer/encoder_norm/bias": _n(sd["norm.bias"]),
         "head/kernel": _n(sd["head.weight"]).T, "head/bias": _n(sd["head.bias"])}
    pos = _n(sd["pos_embed"])
    if jax is not None:
        a["cls"] = jax["cls"]
        pos = pos[:, 1:]
    a["pos_embedding"] = pos
    names = ("MultiHeadDotProductAttention_0", "LayerNorm_0", "LayerNorm_1", "MlpBlock_0")
    blocks = [_block_arrays(sd, f"blocks.{i}.", spec, names) for i in range(spec.depth)]
    if scanned:
        for k in blocks[0]:
            a[f"Transformer/encoderblock/{k}"] = np.stack([b[k] for b in blocks])
    else:
        for i, blk in enumerate(blocks):
            a.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in blk.items()})
    if bf16:
        a = {k: torch.from_numpy(np.ascontiguousarray(v)).bfloat16().view(torch.int16).numpy().view("V2")
             for k, v in a.items()}
    out = {prefix + k: v for k, v in a.items()}
    out["opt/state/mu/embedding/kernel"] = np.zeros(3, np.float32)
    return out


@pytest.mark.parametrize("spec", [PLAIN, REP], ids=["plain", "pre_logits"])
def test_vit_jax_npz_reproduces_logits(tmp_path, spec):
    model = random_model(spec, seed=3)
    np.savez(tmp_path / "ViT-test.npz", **vit_jax_arrays(model.state_dict(), spec))
    sd, got_spec, meta = read_weights(tmp_path / "ViT-test.npz")
    assert meta["layout"] == "vit_jax" and got_spec == spec
    with torch.no_grad():
        torch.testing.assert_close(logits(sd, got_spec), model(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["cls", "gap"])
@pytest.mark.parametrize("scanned", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("prefix,bf16", [("params/", False), ("params/img/", True)])
def test_big_vision_npz_reads(tmp_path, pool, scanned, prefix, bf16):
    spec = replace(PLAIN, pool=pool)
    model = random_model(spec, seed=4)
    with torch.no_grad():
        if pool == "cls":
            model.pos_embed[:, 0] = 0  # big_vision gives the class token no position embedding
        if bf16:
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    np.savez(tmp_path / "bv.npz", **big_vision_arrays(model.state_dict(), spec, prefix, scanned, bf16))
    sd, got_spec, meta = read_weights(tmp_path / "bv.npz")
    assert (meta["layout"], meta["prefix"], meta["scanned"], meta["ignored_keys"]) == \
        ("big_vision", prefix, scanned, 1)
    assert got_spec == spec
    assert_same_weights(model.state_dict(), {k: v.float() for k, v in sd.items()})
    with torch.no_grad():
        torch.testing.assert_close(logits(sd, got_spec), model(X), atol=1e-5, rtol=1e-5)


def test_npz_with_parts_we_do_not_have_is_refused(tmp_path):
    arrays = vit_jax_arrays(random_model(PLAIN).state_dict(), PLAIN)
    np.savez(tmp_path / "map.npz", **arrays, **{"MAPHead_0/probe": np.zeros((1, 1, 64), np.float32)})
    with pytest.raises(UserError, match="MAPHead_0"):
        read_weights(tmp_path / "map.npz")
    extra = {"Transformer/encoderblock_0/LayerScale_0/scale": np.zeros(64)}
    np.savez(tmp_path / "extra.npz", **arrays, **extra)
    with pytest.raises(UserError, match="LayerScale_0"):
        read_weights(tmp_path / "extra.npz")
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(UserError, match="encoderblock_1/MlpBlock_3/Dense_1/bias"):
        read_weights(tmp_path / "partial.npz")


# ---------------------------------------------------------------- HF transformers


def hf_config(**kw):
    transformers = pytest.importorskip("transformers")
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                image_size=16, patch_size=4, layer_norm_eps=1e-6, hidden_act="gelu")
    return transformers, transformers.ViTConfig(**{**base, **kw})


def test_hf_classifier_round_trip_matches_transformers(tmp_path):
    transformers, cfg = hf_config(num_labels=5)
    torch.manual_seed(5)
    hf = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():
        hf.classifier.weight.normal_(std=0.3)
    hf.save_pretrained(tmp_path / "hf_src")
    sd, spec, meta = read_weights(tmp_path / "hf_src")
    assert meta["format"] == "hf" and spec == PLAIN and not meta.get("warnings")
    with torch.no_grad():
        expected = hf(pixel_values=X).logits
    torch.testing.assert_close(logits(sd, spec), expected, atol=1e-5, rtol=1e-5)

    assert convert.main([str(tmp_path / "hf_src"), str(tmp_path / "ours.safetensors"), "--to", "safetensors",
                         "--verify"]) == 0
    assert convert.main([str(tmp_path / "hf_src"), str(tmp_path / "bf16.safetensors"), "--to", "safetensors",
                         "--dtype", "bf16", "--drop-head", "--verify"]) == 0
    assert convert.main([str(tmp_path / "ours.safetensors"), str(tmp_path / "hf_dst"), "--to", "hf",
                         "--verify"]) == 0
    again = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf_dst").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=X).logits, expected, atol=1e-5, rtol=1e-5)
    assert_same_weights(sd, read_weights(tmp_path / "hf_dst")[0])


def test_our_pre_logits_is_the_hf_pooler(tmp_path):
    transformers, _ = hf_config()
    src, sd = write_ours(tmp_path, REP)
    assert convert.main([str(src), str(tmp_path / "hf"), "--to", "hf", "--verify"]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["ViTModel"] and cfg["layer_norm_eps"] == 1e-6
    hf = transformers.ViTModel.from_pretrained(tmp_path / "hf").eval()
    ours = random_model(REP)
    with torch.no_grad():
        pooled = ours.forward_head(ours.forward_features(X), pre_logits=True)
        torch.testing.assert_close(hf(pixel_values=X).pooler_output, pooled, atol=1e-5, rtol=1e-5)
    back, spec, _ = read_weights(tmp_path / "hf")
    assert spec == REP
    assert_same_weights(sd, back)


def test_hf_vitmodel_with_pooler_reads_as_pre_logits(tmp_path):
    transformers, cfg = hf_config(pooler_output_size=32)
    torch.manual_seed(6)
    hf = transformers.ViTModel(cfg, add_pooling_layer=True).eval()
    hf.save_pretrained(tmp_path / "hf")
    sd, spec, _ = read_weights(tmp_path / "hf")
    assert (spec.representation_size, spec.num_classes) == (32, 0)
    with torch.no_grad():
        torch.testing.assert_close(logits(sd, spec), hf(pixel_values=X).pooler_output, atol=1e-5, rtol=1e-5)


def _hf_default_eps_classifier(tmp_path: Path):
    """A transformers classifier with HF's own defaults (LayerNorm eps 1e-12) at hidden 32, 2 layers,
    image 32, patch 8, saved by ``save_pretrained``; (model, folder, fixed batch)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=5)
    assert cfg.layer_norm_eps == 1e-12
    torch.manual_seed(7)
    hf = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():
        hf.classifier.weight.normal_(std=0.3)
    hf.save_pretrained(tmp_path / "hf_src")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return hf, tmp_path / "hf_src", x


def test_hf_eps_1e12_round_trips_exactly(tmp_path, capsys):
    """HF -> vitscale and HF -> vitscale -> HF give transformers' own logits (issue 21: with eps
    fixed at 1e-6 they were off by 1.6e-5 here, 3e-4 at ViT-B/16)."""
    import pretrain

    hf, src, x = _hf_default_eps_classifier(tmp_path)
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
    with torch.no_grad():
        assert (pretrain.load_model(src)(x) - expected).abs().max().item() <= 1e-6
    sd, spec, meta = read_weights(src)
    assert spec.norm_eps == 1e-12 and not meta.get("warnings")

    ours = tmp_path / "ours.safetensors"
    assert convert.main([str(src), str(ours), "--to", "safetensors", "--verify"]) == 0
    assert load_safetensors(ours)[1].norm_eps == 1e-12
    assert inspect(ours)["spec"]["norm_eps"] == 1e-12
    assert cli.main(["inspect", str(ours)]) == 0 and "norm_eps=1e-12" in capsys.readouterr().out
    assert convert.main([str(ours), str(tmp_path / "hf_dst"), "--to", "hf", "--verify"]) == 0
    assert json.loads((tmp_path / "hf_dst" / "config.json").read_text())["layer_norm_eps"] == 1e-12
    again = type(hf).from_pretrained(tmp_path / "hf_dst").eval()
    with torch.no_grad():
        assert (again(pixel_values=x).logits - expected).abs().max().item() <= 1e-6
    assert_same_weights(sd, read_weights(tmp_path / "hf_dst")[0])


def test_files_written_before_norm_eps_read_as_1e6(tmp_path):
    """Our safetensors files and DeepSpeed checkpoints of earlier versions store a model_spec
    without norm_eps: they are the 1e-6 models they always were."""
    sd = random_model(PLAIN).state_dict()
    spec = {k: v for k, v in PLAIN.to_dict().items() if k != "norm_eps"}
    save_file(sd, tmp_path / "old.safetensors", {"format": "vitscale", "model_spec": json.dumps(spec)})
    assert load_safetensors(tmp_path / "old.safetensors")[1].norm_eps == 1e-6


def test_verify_names_transformers_as_the_oracle_of_a_hf_source(tmp_path, capsys):
    import transformers

    _, src, _ = _hf_default_eps_classifier(tmp_path)
    assert convert.main([str(src), str(tmp_path / "ours.safetensors"), "--to", "safetensors", "--verify",
                         "--atol", "1e-6"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "on the source" in ln)
    assert f"oracle transformers {transformers.__version__} ViTForImageClassification logits" in line
    assert line.endswith("ok")
    assert "verify: passed" in out


def test_a_failed_verify_writes_nothing(tmp_path, capsys):
    """A conversion that cannot be exact: .npz does not record HF's eps 1e-12, so the read-back
    differs from transformers' logits by more than a tolerance of 1e-9. No output, exit 1, one
    line with the max |diff| and the tolerance."""
    _, src, _ = _hf_default_eps_classifier(tmp_path)
    dst = tmp_path / "out.npz"
    assert convert.main([str(src), str(dst), "--to", "npz", "--verify", "--atol", "1e-9"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_src"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("verify: FAILED: max |diff| ") and "> tolerance 1e-09" in last


# ---------------------------------------------------------------- verify, wrong inputs, inspect


def test_verify_fails_on_a_broken_writer(tmp_path, monkeypatch, capsys):
    """The writer (a test hook in the format registry) corrupts one weight: verify fails before the
    output is moved into place, so nothing is written and an existing DST stays as it was."""
    src, _ = write_ours(tmp_path, PLAIN)

    def broken(sd, spec, dst, meta):
        sd = dict(sd)
        sd["blocks.0.attn.proj.weight"] = sd["blocks.0.attn.proj.weight"].clone()
        sd["blocks.0.attn.proj.weight"][3, 5] += 0.05
        write_vit_jax_npz(sd, spec, dst)

    good = tmp_path / "good.npz"
    assert convert.main([str(src), str(good), "--to", "npz"]) == 0
    before = good.read_bytes()
    monkeypatch.setitem(REGISTRY, "npz", replace(REGISTRY["npz"], write=broken))
    assert convert.main([str(src), str(tmp_path / "bad.npz"), "--to", "npz", "--verify"]) == 1
    assert convert.main([str(src), str(good), "--to", "npz", "--verify", "--force"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.npz", "ours.safetensors"]
    assert good.read_bytes() == before
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "FAILED: max |diff|" in last and "tolerance 0.0001" in last


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    src, sd = write_ours(tmp_path, PLAIN)
    meta = {"format": "vitscale", "model_spec": json.dumps(PLAIN.to_dict())}
    partial = {k: v for k, v in sd.items() if k != "blocks.1.attn.proj.weight"}
    save_file(partial, tmp_path / "a.safetensors", meta)
    with pytest.raises(UserError, match=r"missing tensors: blocks\.1\.attn\.proj\.weight"):
        load_safetensors(tmp_path / "a.safetensors")
    save_file({**sd, "norm.bias": torch.zeros(63)}, tmp_path / "b.safetensors", meta)
    with pytest.raises(UserError, match=r"wrong shapes: norm\.bias \[63\] \(expected \[64\]\)"):
        read_weights(tmp_path / "b.safetensors")
    timm_sd = {**sd, "fc_norm.weight": torch.ones(64)}
    torch.save(timm_sd, tmp_path / "c.pth")
    with pytest.raises(UserError, match="fc_norm"):
        read_weights(tmp_path / "c.pth")


def test_unknown_format_and_missing_path(tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(UserError, match="cannot tell the format of .*weights.txt"):
        read_weights(tmp_path / "weights.txt")
    with pytest.raises(UserError, match="nothere.npz does not exist"):
        read_weights(tmp_path / "nothere.npz")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match="does not recognise"):
        detect_format(tmp_path / "emptydir")


def test_existing_dst_needs_force_and_force_only_replaces_its_own_kind(tmp_path, capsys):
    src, _ = write_ours(tmp_path, PLAIN)
    dst = tmp_path / "out.npz"
    dst.write_bytes(b"precious")
    assert cli.main(["convert", str(src), str(dst), "--to", "npz"]) == 2
    err = capsys.readouterr().err
    assert "out.npz already exists" in err and "--force" in err
    assert dst.read_bytes() == b"precious"
    assert cli.main(["convert", str(src), str(dst), "--to", "npz", "--force"]) == 0
    assert detect_format(dst) == "npz"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a HF transformers ViT directory"):
        convert.main([str(src), str(other), "--to", "hf", "--force"])
    assert (other / "todo.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="is \\(or contains\\) the source"):
        convert.main([str(src), str(src), "--to", "safetensors", "--force"])


def test_unknown_heads_ask_for_heads(tmp_path):
    spec = replace(PLAIN, width=48, heads=3, mlp_dim=96)
    sd = random_model(spec).state_dict()
    torch.save(sd, tmp_path / "w48.pth")
    _, got, _ = read_weights(tmp_path / "w48.pth")
    assert got is None
    with pytest.raises(UserError, match="--heads"):
        convert.main([str(tmp_path / "w48.pth"), str(tmp_path / "o.safetensors"), "--to", "safetensors"])
    assert convert.main([str(tmp_path / "w48.pth"), str(tmp_path / "o.safetensors"), "--to", "safetensors",
                         "--heads", "3"]) == 0
    assert load_safetensors(tmp_path / "o.safetensors")[1] == spec


def test_inspect_reports_spec_without_loading(tmp_path, monkeypatch, capsys):
    src, _ = write_ours(tmp_path, REP)
    monkeypatch.setattr("pretrain.formats.ours.load_file",
                        lambda *a, **k: pytest.fail("inspect loaded the tensors"))
    info = inspect(src)
    assert info["format"] == "safetensors" and info["spec"] == REP.to_dict() and info["step"] == 7
    assert info["parameters"] == sum(p.numel() for p in build_model(REP).parameters())
    assert cli.main(["inspect", str(src), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"]["representation_size"] == 64
    np.savez(tmp_path / "v.npz", **vit_jax_arrays(random_model(PLAIN).state_dict(), PLAIN))
    assert inspect(tmp_path / "v.npz")["spec"] == PLAIN.to_dict()


# ---------------------------------------------------------------- timm's own models as the oracle

def _timm_model(spec, seed: int = 0):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from pretrain.formats.timm import timm_kwargs

    torch.manual_seed(seed)
    model = TimmViT(**timm_kwargs(spec))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model.eval()


@pytest.mark.parametrize("spec", [PLAIN, GAP], ids=["cls", "gap"])
def test_timm_state_dict_gives_timms_logits(tmp_path, spec):
    theirs = _timm_model(spec)
    torch.save(theirs.state_dict(), tmp_path / "timm.pth")
    sd, got, meta = read_weights(tmp_path / "timm.pth")
    assert meta["format"] == "timm" and got == spec
    with torch.no_grad():
        torch.testing.assert_close(logits(sd, got), theirs(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("safe", [True, False], ids=["model.safetensors", "pytorch_model.bin"])
def test_a_timm_hub_folder_is_read_as_timm_not_hf(tmp_path, capsys, safe):
    """The layout of every timm/... Hub repository (config.json with `architecture`, no
    `model_type`), as timm itself writes it."""
    import timm
    from timm.models._hub import save_for_hf

    import pretrain

    spec = spec_for("vit_test4", img_size=16, num_classes=5, width=48, heads=3, mlp_dim=96)  # heads from config.json
    args = {"img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0,
            "num_classes": 5}
    torch.manual_seed(0)
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(std=0.3)
    hub = tmp_path / "hub"
    save_for_hf(theirs, hub, model_args=args, safe_serialization=safe)
    weights = hub / ("model.safetensors" if safe else "pytorch_model.bin")
    assert detect_format(hub) == detect_format(weights) == "timm"
    ours = pretrain.load_model(hub)
    assert ours.spec == spec
    with torch.no_grad():
        torch.testing.assert_close(ours(X), theirs(X), atol=1e-5, rtol=1e-5)
    assert convert.main([str(hub), str(tmp_path / "ours.safetensors"), "--to", "safetensors", "--verify"]) == 0
    oracle = f"oracle timm {timm.__version__} create_model('vit_tiny_patch16_224') logits on the source {hub}"
    assert oracle in capsys.readouterr().out


@pytest.mark.parametrize("name", ["timm.safetensors", "timm.pth"])
def test_verify_names_timm_as_the_oracle_of_a_timm_source(tmp_path, capsys, name):
    """A file timm wrote from its own model is compared with timm's own model loaded by timm."""
    import timm
    from safetensors.torch import save_file as timm_save

    theirs = _timm_model(PLAIN)
    if name.endswith(".safetensors"):
        timm_save(theirs.state_dict(), tmp_path / name)
    else:
        torch.save(theirs.state_dict(), tmp_path / name)
    assert convert.main([str(tmp_path / name), str(tmp_path / "ours.safetensors"), "--to", "safetensors",
                         "--verify", "--atol", "1e-6"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "on the source" in ln)
    assert f"oracle timm {timm.__version__} VisionTransformer logits on the source" in line and line.endswith("ok")


def test_timm_export_verifies_and_reads_back_without_heads(tmp_path, capsys):
    """A width no known variant has: the read-back uses the written spec's heads (no --heads)."""
    spec = spec_for("vit_test4", img_size=16, num_classes=5, width=48, heads=3)
    src, sd = write_ours(tmp_path, spec)
    assert convert.main([str(src), str(tmp_path / "out.pth"), "--to", "timm", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "VisionTransformer logits on the output: max |diff| 0.000e+00 ok" in out and "verify: passed" in out


@pytest.mark.parametrize("spec", [PLAIN, GAP], ids=["cls", "gap"])
def test_our_npz_loads_in_timms_google_checkpoint_loader(tmp_path, spec):
    """timm's own reader of Google vit_jax checkpoints (`_load_weights`) takes our .npz export and
    gives our logits."""
    from timm.models.vision_transformer import _load_weights

    src, sd = write_ours(tmp_path, spec)
    assert convert.main([str(src), str(tmp_path / "ViT.npz"), "--to", "npz"]) == 0
    theirs = _timm_model(spec, seed=5)
    _load_weights(theirs, str(tmp_path / "ViT.npz"))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(X), logits(sd, spec), atol=1e-5, rtol=1e-5)
