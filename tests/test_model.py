import pytest
import torch

from pretrain.model.costs import model_costs
from pretrain.model.vit import build_model, reference_attention, spec_for, variant_names


def test_sdpa_path_equals_plain_attention():
    torch.manual_seed(0)
    model = build_model(spec_for("vit_test4", img_size=16, num_classes=5))
    for p in model.parameters():  # non-zero head so logits carry the whole network
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(model(x, use_sdpa=True), model(x, use_sdpa=False), atol=1e-5, rtol=1e-5)


def test_reference_attention_matches_sdpa_shapes():
    q, k, v = (torch.randn(2, 4, 17, 80) for _ in range(3))
    ref = reference_attention(q, k, v)
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, k, v), ref,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,params_m,gmacs", [("vit_b16", 86, 17.6), ("vit_l16", 304, 61.6),
                                                 ("vit_h14", 632, 167.4)])
def test_paper_sizes_on_meta_device(name, params_m, gmacs):
    c = model_costs(spec_for(name, num_classes=1000))
    assert abs(c["params"] / 1e6 - params_m) / params_m < 0.01
    assert abs(c["gmacs_fwd"] - gmacs) / gmacs < 0.005
    assert c["train_tflops_per_image"] == pytest.approx(6 * c["gmacs_fwd"] / 1e3)


def test_vit_h14_reference_facts():
    c = model_costs(spec_for("vit_h14", num_classes=1000))
    assert c["seq_len"] == 257 and c["head_dim"] == 80
    assert c["params_backbone"] == c["params"] - (1280 * 1000 + 1000)


def test_pre_logits_present_and_absent():
    with_pre = build_model(spec_for("vit_test4", img_size=16, num_classes=7, representation_size="auto"))
    without = build_model(spec_for("vit_test4", img_size=16, num_classes=7))
    assert "pre_logits.weight" in with_pre.state_dict()
    assert not any(k.startswith("pre_logits") for k in without.state_dict())
    x = torch.randn(2, 3, 16, 16)
    feats = with_pre.forward_head(with_pre.forward_features(x), pre_logits=True)
    assert feats.shape == (2, 64) and feats.abs().max() <= 1.0  # tanh
    assert with_pre(x).shape == (2, 7)


def test_head_is_zero_initialised_with_bias_option():
    m = build_model(spec_for("vit_test4", img_size=16, num_classes=3), head_bias_init=-10.0)
    assert torch.all(m.head.weight == 0) and torch.all(m.head.bias == -10.0)


def test_run_time_options_leave_the_architecture_and_the_state_dict_alone():
    """Dropout, head bias and activation checkpointing are chosen at build / run time: a model
    built with them has the same keys and shapes, and the spec holds architecture only."""
    from dataclasses import fields

    from pretrain.model.vit import ViTSpec
    from pretrain.train.config import ModelConfig

    spec = spec_for("vit_test4", img_size=16, num_classes=3)
    plain, tuned = build_model(spec), build_model(spec, dropout=0.1, attn_dropout=0.1, head_bias_init=-2.0)
    tuned.set_grad_checkpointing(True)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in tuned.state_dict().items()}
    assert not {"dropout", "attn_dropout", "head_bias_init", "act_ckpt"} & {f.name for f in fields(ViTSpec)}
    assert {f.name for f in fields(ViTSpec)} <= {f.name for f in fields(ModelConfig)}  # derived, every field


def test_gap_pooling_has_no_class_token():
    m = build_model(spec_for("vit_test4", img_size=16, num_classes=3, pool="gap"))
    assert "cls_token" not in m.state_dict() and m.pos_embed.shape[1] == 16
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = build_model(spec_for("vit_test4", img_size=16, num_classes=3))
    b = build_model(spec_for("vit_test4", img_size=16, num_classes=3))
    b.set_grad_checkpointing(True)
    b.load_state_dict(a.state_dict())
    torch.nn.init.normal_(a.head.weight)
    b.head.weight.data.copy_(a.head.weight)
    x = torch.randn(2, 3, 16, 16)
    a(x).sum().backward()
    b(x).sum().backward()
    torch.testing.assert_close(a.blocks[0].attn.qkv.weight.grad, b.blocks[0].attn.qkv.weight.grad)


def test_every_named_variant_builds_on_meta():
    for name in variant_names():
        spec = spec_for(name, img_size=224 if not name.startswith(("vit_test", "vit_micro")) else 32)
        build_model(spec, device="meta")


def test_unknown_variant_names_the_options():
    with pytest.raises(ValueError, match="vit_<size><patch>"):
        spec_for("vit_q16")


def test_selective_activation_checkpointing_spreads_blocks_and_keeps_gradients():
    spec = spec_for("vit_test4", img_size=16, num_classes=3, depth=6)
    torch.manual_seed(0)
    model, x = build_model(spec), torch.randn(2, 3, 16, 16)
    torch.nn.init.normal_(model.head.weight)
    grads = {}
    for setting in (False, 0.5, 1 / 3, True):
        model.set_grad_checkpointing(setting)
        model.zero_grad()
        model(x).square().sum().backward()
        grads[setting] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.set_grad_checkpointing(0.5)
    assert model.checkpointed == [False, True, False, True, False, True]
    model.set_grad_checkpointing(1 / 3)
    assert sum(model.checkpointed) == 2
    for setting in (0.5, 1 / 3, True):
        for name, g in grads[False].items():
            torch.testing.assert_close(grads[setting][name], g, rtol=1e-5, atol=1e-6)


def test_patch_dropout_cuts_training_flops_and_leaves_eval_alone():
    from pretrain.model.costs import model_costs

    spec = spec_for("vit_b16")
    full, half = model_costs(spec), model_costs(spec, 0.5)
    assert half["gmacs_fwd"] == full["gmacs_fwd"]  # evaluation sees every patch
    assert half["train_tflops_per_image"] < 0.51 * full["train_tflops_per_image"]  # 98 + 1 of 197 tokens
    small = spec_for("vit_test4", img_size=16, num_classes=3)
    torch.manual_seed(0)
    dropped = build_model(small, patch_dropout=0.5)
    plain = build_model(small)
    plain.load_state_dict(dropped.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(dropped.eval().forward_features(x), plain.eval().forward_features(x))
    assert dropped.train().forward_features(x).shape == (2, 1 + 8, 64)  # class token + 8 of 16 patches
