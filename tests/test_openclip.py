"""OpenCLIP image towers through the format registry, against open_clip's own model: files made by
open_clip (``create_model`` with random weights, saved as its users save them), features compared
with ``encode_image``, conversion verified by open_clip, fine-tuning from the tower."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.commands import convert
from pretrain.core.errors import UserError
from pretrain.formats import detect_format, read_weights, save_safetensors
from pretrain.formats.inspect import inspect
from pretrain.model.surgery import finetune_state_dict
from pretrain.model.vit import build_model, spec_for


def _open_clip():
    """open_clip, imported when a test needs it (not at collection: it takes seconds)."""
    return pytest.importorskip("open_clip")


# the image tower has vit_test4's dimensions (width 64, depth 2, MLP 128, 4 heads, patch 4)
VISION = {"image_size": 32, "patch_size": 4, "width": 64, "layers": 2, "head_width": 16, "mlp_ratio": 2.0}
TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def clip_config(quick_gelu: bool, **vision) -> dict:
    return {"embed_dim": 32, "quick_gelu": quick_gelu, "vision_cfg": {**VISION, **vision}, "text_cfg": TEXT}


def clip_model(cfg: dict):
    """open_clip's own CLIP model with random weights; the image tower's LayerNorms, biases and
    embeddings moved off their init values, so that a mapping mistake shows."""
    torch.manual_seed(0)
    model = _open_clip().create_model("ViT-B-32", **cfg).eval()
    with torch.no_grad():
        for p in model.visual.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def save_hub_folder(model, cfg: dict, folder) -> None:
    """An OpenCLIP Hub folder as open_clip's ``save_for_hf`` writes it (its config writer and its
    weights file; the tokenizer files play no part here)."""
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(model.state_dict(), str(folder / HF_SAFE_WEIGHTS_NAME))
    save_config_for_hf(model, folder / HF_CONFIG_NAME, model_config=cfg)


def features(sd, spec) -> torch.Tensor:
    model = build_model(spec)
    model.load_state_dict(sd)
    with torch.no_grad():
        return model.eval()(X)


def test_a_clip_state_dict_gives_open_clips_image_features(tmp_path):
    """torch.save(model.state_dict()) of a whole CLIP model (GELU, open_clip's default): the image
    tower is read, the text tower ignored, and our output is encode_image's to float32 rounding."""
    model = clip_model(clip_config(quick_gelu=False))
    torch.save(model.state_dict(), tmp_path / "epoch_1.pt")
    assert detect_format(tmp_path / "epoch_1.pt") == "openclip"
    with pytest.warns(UserWarning, match="does not record its activation"):
        sd, spec, meta = read_weights(tmp_path / "epoch_1.pt")
    assert (spec.pre_norm, spec.patch_bias, spec.act, spec.proj_dim, spec.norm_eps, spec.heads) == (
        True, False, "gelu", 32, 1e-5, 4)
    assert meta["ignored_keys"] == len([k for k in model.state_dict() if not k.startswith("visual.")])
    with torch.no_grad():
        ref = model.encode_image(X)
    assert (features(sd, spec) - ref).abs().max().item() < 1e-5


def test_an_openai_style_hub_folder_reads_quick_gelu_from_its_config(tmp_path):
    """A Hub folder (open_clip_config.json + open_clip_model.safetensors) of a QuickGELU model:
    activation and heads come from the config; our features are create_model('local-dir:')'s."""
    cfg = clip_config(quick_gelu=True)
    save_hub_folder(clip_model(cfg), cfg, tmp_path / "hub")
    assert detect_format(tmp_path / "hub") == "openclip"
    sd, spec, meta = read_weights(tmp_path / "hub")
    assert spec.act == "quick_gelu" and spec.heads == 4 and "warnings" not in meta
    loaded = _open_clip().create_model(f"local-dir:{tmp_path / 'hub'}").eval()
    with torch.no_grad():
        ref = loaded.encode_image(X)
    assert (features(sd, spec) - ref).abs().max().item() < 1e-5
    assert inspect(tmp_path / "hub")["spec"]["act"] == "quick_gelu"


def test_convert_verifies_against_open_clip_both_ways(tmp_path, capsys):
    """Hub folder -> our safetensors -> OpenCLIP file: each step verified against open_clip's own
    model (create_model of the folder, its VisionTransformer filled by its own loader from the
    output), and the OpenCLIP file reads back as the same tower."""
    cfg = clip_config(quick_gelu=True)
    save_hub_folder(clip_model(cfg), cfg, tmp_path / "hub")
    ours = tmp_path / "tower.safetensors"
    assert convert.main([str(tmp_path / "hub"), str(ours), "--to", "safetensors", "--verify", "--atol", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert f"oracle open_clip {_open_clip().__version__} create_model('local-dir:') encode_image on the source" in out
    back = tmp_path / "back_openclip.safetensors"
    assert convert.main([str(ours), str(back), "--to", "openclip", "--verify", "--atol", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert f"oracle open_clip {_open_clip().__version__} VisionTransformer image features on the output" in out
    assert "verify: passed" in out
    assert detect_format(back) == "openclip"
    assert read_weights(back)[1] == read_weights(ours)[1]


def test_towers_our_vit_does_not_compute_are_refused(tmp_path):
    model = clip_model(clip_config(quick_gelu=False, ls_init_value=0.1))
    torch.save(model.state_dict(), tmp_path / "layer_scale.pt")
    with pytest.raises(UserError, match="layer scale"):
        read_weights(tmp_path / "layer_scale.pt")
    spec = spec_for("vit_test4", img_size=32, num_classes=10)
    torch.manual_seed(0)
    save_safetensors(build_model(spec).state_dict(), spec, tmp_path / "plain.safetensors")
    with pytest.raises(UserError, match="needs a class token|needs no patch bias"):
        convert.main([str(tmp_path / "plain.safetensors"), str(tmp_path / "o.safetensors"), "--to", "openclip"])
    assert not (tmp_path / "o.safetensors").exists()


def test_finetune_surgery_keeps_the_projection_or_drops_it_on_request(tmp_path):
    model = clip_model(clip_config(quick_gelu=False))
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    with pytest.warns(UserWarning):
        sd, spec, _ = read_weights(tmp_path / "clip.pt")
    keep = spec_for("vit_test4", img_size=48, num_classes=6, representation_size=None, pre_norm=True,
                    patch_bias=False, proj_dim=32, norm_eps=1e-5)
    out, report = finetune_state_dict(sd, keep)
    assert out["head.weight"].shape == (6, 32) and torch.equal(out["proj.weight"], sd["proj.weight"])
    assert report.new == ["head.weight", "head.bias"] and report.dropped == []
    drop = spec_for("vit_test4", img_size=48, num_classes=6, representation_size=None, pre_norm=True,
                    patch_bias=False, norm_eps=1e-5)
    out, report = finetune_state_dict(sd, drop)
    assert out["head.weight"].shape == (6, 64) and "proj.weight" not in out and report.dropped == ["proj.weight"]
    build_model(drop).load_state_dict(out)


def test_finetune_from_an_openclip_hub_folder(tmp_path):
    """vitscale finetune --init HUB_FOLDER with a recipe that names the variant: the tower's parts
    (pre-norm, no patch bias, QuickGELU, projection, eps 1e-5) come from the weights, the new zero
    head reads the image embedding, and one step trains."""
    import yaml

    from tests.helpers import read_metrics, vitscale

    cfg = clip_config(quick_gelu=True)
    save_hub_folder(clip_model(cfg), cfg, tmp_path / "hub")
    run = tmp_path / "run"
    proc = vitscale("finetune", "--config", "configs/demo_finetune_cpu.yaml", "--init", str(tmp_path / "hub"),
                    "--nproc-per-node", "1", f"run.dir={run}", "train.steps=1", "train.micro_batch=8",
                    "data.val_samples=16", "data.workers=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'model.pre_norm=true model.patch_bias=false model.act="quick_gelu" model.proj_dim=32' in proc.stdout
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert (model["norm_eps"], model["act"], model["proj_dim"], model["pre_norm"]) == (1e-5, "quick_gelu", 32, True)
    event = [r for r in read_metrics(run, "event") if r.get("event") == "finetune_init"][0]
    assert event["format"] == "openclip" and sorted(event["new"]) == ["head.bias", "head.weight"]
    assert event["dropped"] == [] and json.dumps(event["resampled"]["pos_embed"]) == "[[1, 65, 64], [1, 145, 64]]"
