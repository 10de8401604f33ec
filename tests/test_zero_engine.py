"""Real DeepSpeed ZeRO on CPU: 2 gloo processes, bf16."""

import json

import pytest

from tests.helpers import ROOT, torchrun


def _run(stage: int, steps: int, tmp_path) -> list[dict]:
    out = tmp_path / f"zero{stage}.json"
    torchrun(ROOT / "tests/scripts/zero_train.py", str(stage), str(steps), str(out), timeout=300)
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_bf16_training_learns(stage, tmp_path):
    ranks = _run(stage, 25, tmp_path)
    losses = ranks[0]["losses"]
    assert ranks[0]["param_dtype"] == "torch.bfloat16"
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3, losses
    if stage == 3:
        total = ranks[0]["total_params"]
        for r in ranks:
            assert 0.45 * total <= r["held_params"] <= 0.55 * total, (r["held_params"], total)
        assert sum(r["held_params"] for r in ranks) >= total
    else:
        assert all(r["held_params"] == r["total_params"] for r in ranks)
