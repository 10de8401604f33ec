"""The weights-format registry's contract: every registered format that can be written detects its
own output and reads it back with the same weights, spec and logits; a new format is one entry
(detection, reading, writing, convert, inspect and verify pick it up); the README lists every
registered format; a model with CLIP-tower parts round-trips through our own file and is refused,
writing nothing, by formats that cannot hold it."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pretrain import cli
from pretrain.commands import convert
from pretrain.core.errors import UserError
from pretrain.formats import REGISTRY, detect_format, read_weights, save_safetensors
from pretrain.formats.inspect import inspect
from pretrain.formats.registry import Oracle, WeightsFormat
from pretrain.formats.state_dict import max_abs_diff, spec_from_dict
from pretrain.model.vit import ViTSpec, build_model, spec_for
from tests.helpers import ROOT

PLAIN = spec_for("vit_test4", img_size=16, num_classes=5)
# an OpenCLIP-like image tower: LayerNorm before the blocks, no patch bias, QuickGELU, projection
CLIP = ViTSpec(img_size=16, patch_size=4, width=64, depth=2, mlp_dim=128, heads=4, num_classes=0, norm_eps=1e-5,
               pre_norm=True, patch_bias=False, act="quick_gelu", proj_dim=32)
X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def random_state(spec: ViTSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every weight random (the default init zeroes the head and the LayerNorm biases)."""
    torch.manual_seed(seed)
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model.state_dict()


def logits(sd: dict, spec: ViTSpec) -> torch.Tensor:
    model = build_model(spec)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    with torch.no_grad():
        return model.eval()(X)


def outputs(fmt: WeightsFormat) -> list[str]:
    return [f"out_{fmt.name}"] if fmt.directory else [f"out{suffix}" for suffix in fmt.suffixes]


WRITERS = [name for name, fmt in REGISTRY.items() if fmt.write is not None]


@pytest.mark.parametrize("name", WRITERS)
def test_every_writable_format_detects_and_reads_back_its_own_output(tmp_path, name, capsys):
    """For each output name of the format and each model it can hold (the ViT paper's, a CLIP
    tower): convert --verify passes, the output is detected as this format, and it reads back with
    the same spec, the same tensors and the same logits. A model it cannot hold is refused with a
    message and leaves nothing behind; every format holds at least one."""
    fmt = REGISTRY[name]
    held = 0
    for label, spec in (("plain", PLAIN), ("clip", CLIP)):
        sd = random_state(spec)
        (tmp_path / label).mkdir()
        src = tmp_path / label / "src.safetensors"
        save_safetensors(sd, spec, src)
        for out_name in outputs(fmt):
            dst = tmp_path / label / out_name
            try:
                code = convert.main([str(src), str(dst), "--to", name, "--verify", "--atol", "1e-5"])
            except UserError as err:
                assert sorted(p.name for p in dst.parent.iterdir()) == ["src.safetensors"], str(err)
                continue
            assert code == 0, capsys.readouterr().out
            held += 1
            assert detect_format(dst) == name
            back, back_spec, meta = read_weights(dst, heads=spec.heads)
            assert meta["format"] == name
            assert back_spec == spec, (back_spec, spec)
            assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
            assert max_abs_diff(logits(back, back_spec), logits(sd, spec)) == 0.0
            assert inspect(dst, heads=spec.heads)["format"] == name
    assert held, f"{name} holds neither the ViT paper's model nor a CLIP tower"


def test_registry_entries_are_complete():
    """Every entry can be read and detected; every target has a way to be written and named; only
    training checkpoints have EMA weights."""
    for name, fmt in REGISTRY.items():
        assert fmt.name == name and fmt.summary and callable(fmt.detect) and callable(fmt.read)
        if fmt.write is not None:
            assert fmt.directory or fmt.suffixes, name
        assert fmt.written_from in (None, *REGISTRY), name
    assert [n for n, f in REGISTRY.items() if f.read_ema] == ["deepspeed"]


# ---------------------------------------------------------------- a new format is one entry


def _bundle_write(sd, spec, path, meta):
    torch.save({"model_spec": spec.to_dict(), "state_dict": {k: v.contiguous() for k, v in sd.items()}}, path)


def _bundle_read(path, heads):
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["state_dict"], spec_from_dict(obj["model_spec"], str(path)), {"layout": "bundle"}


def _bundle_oracle(path, spec, ours, x):
    sd, spec, _ = _bundle_read(path, None)
    with torch.no_grad():
        return "the bundle's own loader", max_abs_diff(logits(sd, spec), ours(X))


BUNDLE = WeightsFormat("bundle", "a torch file holding the spec beside the state dict",
                       detect=lambda p: p.is_file() and p.suffix == ".vitpt", read=_bundle_read,
                       write=_bundle_write, suffixes=(".vitpt",), oracle=Oracle("torch", _bundle_oracle))


def test_a_new_format_is_one_registry_entry(tmp_path, monkeypatch, capsys):
    """One entry (its functions would be one module) and nothing else: convert --to / --from,
    detection, read_weights, inspect and verify's oracle all know the new format."""
    monkeypatch.setitem(REGISTRY, "bundle", BUNDLE)
    sd = random_state(PLAIN)
    src = tmp_path / "src.safetensors"
    save_safetensors(sd, PLAIN, src)
    assert cli.main(["convert", str(src), str(tmp_path / "m.vitpt"), "--to", "bundle", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "oracle the bundle's own loader on the output: max |diff| 0.000e+00 ok" in out
    assert detect_format(tmp_path / "m.vitpt") == "bundle"
    back, spec, meta = read_weights(tmp_path / "m.vitpt")
    assert spec == PLAIN and meta["format"] == "bundle" and all(torch.equal(back[k], sd[k]) for k in sd)
    assert cli.main(["inspect", str(tmp_path / "m.vitpt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "bundle" and info["spec"] == PLAIN.to_dict() and info["layout"] == "bundle"
    assert cli.main(["convert", str(tmp_path / "m.vitpt"), str(tmp_path / "back.safetensors"), "--from", "bundle",
                     "--to", "safetensors", "--verify"]) == 0
    assert "verify: oracle the bundle's own loader on the source" in capsys.readouterr().out


# ---------------------------------------------------------------- CLIP towers and the plain formats


def test_a_clip_tower_spec_round_trips_through_our_file_and_reads_as_it_was(tmp_path):
    sd = random_state(CLIP)
    save_safetensors(sd, CLIP, tmp_path / "clip.safetensors")
    back, spec, _ = read_weights(tmp_path / "clip.safetensors")
    assert spec == CLIP and "norm_pre.weight" in back and "patch_embed.proj.bias" not in back
    assert back["proj.weight"].shape == (32, 64)
    assert inspect(tmp_path / "clip.safetensors")["spec"]["act"] == "quick_gelu"


@pytest.mark.parametrize("to,name", [("npz", "out.npz"), ("timm", "out.pth"), ("hf", "out_hf")])
def test_plain_vit_formats_refuse_clip_parts_and_write_nothing(tmp_path, to, name):
    src = tmp_path / "clip.safetensors"
    save_safetensors(random_state(CLIP), CLIP, src)
    with pytest.raises(UserError, match="no place for a LayerNorm before the blocks.*quick_gelu.*proj_dim 32"):
        convert.main([str(src), str(tmp_path / name), "--to", to])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.safetensors"]


def test_default_specs_record_no_clip_fields():
    """Files of the ViT paper's models stay what they were: older vitscale reads them."""
    assert set(PLAIN.to_dict()) == {"img_size", "patch_size", "width", "depth", "mlp_dim", "heads", "num_classes",
                                    "representation_size", "pool", "norm_eps"}
    assert ViTSpec(**CLIP.to_dict()) == CLIP


# ---------------------------------------------------------------- the README lists the registry


def test_readme_lists_every_registered_format():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## 4. Convert checkpoints"):text.index("## 5.")]
    listed = re.findall(r"^\| `([a-z-]+)` +\|", section, flags=re.M)
    assert listed == list(REGISTRY), listed
    arch = " ".join(text[text.index("### Architecture"):].split())
    assert "one module in `pretrain/formats/` + one registry entry" in arch
    assert "pretrain/formats/registry.py" in arch


def test_ours_is_detected_before_the_catch_all(tmp_path):
    """Detection order is the registry's: our safetensors is claimed before timm, which takes
    every other weights file."""
    sd = random_state(PLAIN)
    save_safetensors(sd, PLAIN, tmp_path / "ours.safetensors")
    torch.save(sd, tmp_path / "plain.pth")
    assert detect_format(tmp_path / "ours.safetensors") == "safetensors"
    assert detect_format(tmp_path / "plain.pth") == "timm"
    assert list(REGISTRY).index("safetensors") < list(REGISTRY).index("timm") == len(REGISTRY) - 1
