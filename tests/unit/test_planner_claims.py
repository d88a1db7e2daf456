"""The cluster profiles the planner fits against, and the design document's claims it answers."""

import pytest

from cluster import profiles as cp
from launcher.errors import PlanError
from launcher.planner import claims


def test_profiles():
    profiles = cp.load_profiles()
    assert {"local-cpu", "a100-40g-1", "a100-80g-1", "a100-80g-x8", "h100-80g-x8", "h200-141g-1"} <= set(profiles)
    local = profiles["local-cpu"]
    assert local["live"] and local["gpus"] == 0 and local["cpus"] >= 1 and local["memory_gib"] > 0
    assert profiles["h100-80g-x8"]["peak_bf16_tflops"] == profiles["h200-141g-1"]["peak_bf16_tflops"] == 989
    with pytest.raises(PlanError, match="did you mean 'a100-80g-1'"):
        cp.get_profile("a100-80g")


def test_design_claims_answered():
    by_claim = {c["claim"]: c for c in claims.claims()}
    full = by_claim["7B full fine-tuning needs 64 GB"]
    assert full["verdict"] == "does-not-hold"
    assert full["planner_bytes"] / 1e9 == pytest.approx(107.8, abs=0.1)
    assert by_claim["QLoRA on a 7B model needs 6 GB"]["verdict"] == "holds"
    assert by_claim["a LoRA r=8 adapter file is 10-50 MB"]["verdict"] == "holds"
    assert by_claim["a LoRA r=32 adapter file is 10-50 MB"]["planner_bytes"] == 2 * 79_953_920
    assert by_claim["a LoRA r=32 adapter file is 10-50 MB"]["verdict"] == "does-not-hold"
    assert by_claim["LoRA r=32 on a 7B LLM = 224M trainable, 3.2%"]["verdict"] == "does-not-hold"
    arr = [c for c in by_claim if c.startswith("ARR-COC")]
    # Checked against the shipped full-size spec's stages, not the LLM alone.
    assert arr and "configs/arrcoc/full.yaml" in by_claim[arr[0]]["detail"]
    assert "texture" in by_claim[arr[0]]["detail"] and "end-to-end" in by_claim[arr[0]]["detail"]
    # One unit system: the seed's decimal GB/MB figures are written in GiB/MiB too.
    for c in by_claim.values():
        assert " GB" not in c["detail"] and " MB" not in c["detail"], c["detail"]
    assert "[does-not-hold] 7B full fine-tuning needs 64 GB" in claims.format_claims()
