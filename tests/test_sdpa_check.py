"""The SDPA backend check names the kernel the dispatcher really runs; require_flash fails clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.core.errors import UserError
from pretrain.model.sdpa import flash_blockers, require_flash, sdpa_backend, sdpa_report

KNOWN = {"cpu-flash", "cpu-math"}


def _ran_cpu_flash(heads: int, seq_len: int, head_dim: int, dtype: torch.dtype,
                   dropout_p: float = 0.0) -> bool:
    """Whether the dispatcher, left alone, ran the CPU flash kernel (seen in the autograd node)."""
    qkv = torch.randn(2, seq_len, 3, heads, head_dim, dtype=dtype, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return out.grad_fn.name().startswith("ScaledDotProductFlashAttentionForCpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_backend_is_the_kernel_that_runs(dtype):
    name = sdpa_backend(batch=8, heads=4, seq_len=17, head_dim=80, dtype=dtype, device="cpu")
    assert name in KNOWN
    assert (name == "cpu-flash") == _ran_cpu_flash(4, 17, 80, dtype)


def test_dropout_moves_cpu_off_flash_and_says_why():
    report = sdpa_report(batch=2, heads=4, seq_len=17, head_dim=32, dtype=torch.float32, device="cpu",
                         dropout_p=0.1)
    assert report.backend == "cpu-math"
    assert any("dropout" in reason for reason in report.rejected["cpu-flash"])
    assert not _ran_cpu_flash(4, 17, 32, torch.float32, dropout_p=0.1)


def test_disabled_backend_is_skipped():
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        assert sdpa_backend(2, 4, 17, 32, torch.bfloat16, "cpu") == "cpu-math"
    finally:
        torch.backends.cuda.enable_flash_sdp(True)
    assert sdpa_backend(2, 4, 17, 32, torch.bfloat16, "cpu") == "cpu-flash"


def test_require_flash_raises_on_cpu_with_reason():
    with pytest.raises(UserError) as err:
        require_flash(batch=2, heads=16, seq_len=257, head_dim=80, dtype=torch.bfloat16, device="cpu")
    msg = str(err.value)
    assert "device is cpu" in msg and "compute capability 8.0" in msg
    assert "'cpu-flash'" in msg and "model.require_flash=false" in msg


def test_flash_blockers_name_dtype_and_head_dim():
    reasons = " | ".join(flash_blockers(head_dim=320, dtype=torch.float32, device="cpu"))
    assert "dtype float32" in reasons and "head_dim 320 > 256" in reasons
    if not torch.cuda.is_available():
        assert flash_blockers(head_dim=80, dtype=torch.bfloat16, device="cuda") == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vit_h_shapes_run_flash_on_ampere_or_newer():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("flash needs sm80+")
    assert sdpa_backend(batch=4, heads=16, seq_len=257, head_dim=80, dtype=torch.bfloat16) == "flash"
    assert require_flash(4, 16, 257, 80, torch.bfloat16) == "flash"
    with pytest.raises(UserError, match="dtype float32"):
        require_flash(4, 16, 257, 80, torch.float32)
