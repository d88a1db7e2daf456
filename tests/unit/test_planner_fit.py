"""The planner's fit verdicts and suggestions, scheduling, time, and how an estimate is printed."""

import json

import pytest

from cluster import profiles as cp
from launcher import planner as est
from launcher.planner import describe
from tests.unit.planner_cases import GIB, LLAMA7B, PSI_7B, TINY, finetune


@pytest.fixture(scope="module")
def full7b():
    return est.count_parameters(LLAMA7B, {"type": "full"})


def test_7b_full_on_a100_40g_is_refused_with_qlora_among_suggestions():
    e = est.estimate(finetune(LLAMA7B, {"type": "full"}, micro_batch=1), "a100-40g-1")
    f = e["fit"]
    assert f["verdict"] == "does-not-fit" and "40 GiB" in f["reason"]
    changes = [s["change"] for s in f["suggestions"]]
    assert any(c.startswith("QLoRA") for c in changes), changes
    for s in f["suggestions"]:  # each one re-estimated, and fits the profile it names
        assert s["per_gpu_bytes"] <= 0.9 * cp.get_profile(s["profile"])["gpu_memory_gib"] * GIB, s
    assert {s["profile"] for s in f["suggestions"] if not s["change"].startswith("profile ")} == {"a100-40g-1"}
    assert not any("ZeRO-3 over" in c for c in changes)  # one worker: ZeRO-3 cannot shard anything


def test_7b_full_fits_eight_h100s_with_zero3():
    spec = finetune(LLAMA7B, {"type": "full"}, workers=8, micro_batch=1, deepspeed={"zero_stage": 3})
    e = est.estimate(spec, "h100-80g-x8")
    assert e["fit"]["verdict"] == "fits"
    assert e["memory"]["total"] < 0.9 * 79.6 * GIB


def test_zero3_over_more_workers_is_suggested_when_it_fits():
    e = est.estimate(finetune(LLAMA7B, {"type": "full"}, workers=8, micro_batch=1), "a100-80g-x8")
    assert e["fit"]["verdict"] == "does-not-fit"
    assert "DeepSpeed ZeRO-3 over the 8 workers" in [s["change"] for s in e["fit"]["suggestions"]]


@pytest.mark.parametrize(
    "profile, workers, gpus, cpus, reason",
    [
        ("a100-80g-1", 1, 2, 4, "asks 2 GPUs but a node of a100-80g-1 has 1"),
        ("a100-80g-x8", 9, 1, 4, "9 workers"),
        ("a100-80g-1", 1, 1, 64, "asks 64 CPUs"),
        ("local-cpu", 1, 1, 0.5, "has no GPU"),
    ],
)
def test_unschedulable_jobs_are_refused(profile, workers, gpus, cpus, reason):
    e = est.estimate(finetune(TINY, {"type": "full"}, workers=workers, gpus=gpus, cpus=cpus), profile)
    assert e["fit"]["verdict"] == "cannot-schedule"
    assert reason in e["fit"]["reason"]


def test_two_gpus_per_worker_suggests_one():
    e = est.estimate(finetune(TINY, {"type": "full"}, gpus=2), "a100-80g-1")
    assert e["fit"]["verdict"] == "cannot-schedule"
    assert e["fit"]["suggestions"][0]["settings"] == {"gpus_per_worker": 1}


def test_tiny_job_fits_this_machine():
    e = est.estimate(finetune(TINY, {"type": "lora", "r": 8}, workers=2, gpus=0, cpus=0.5, micro_batch=8), None)
    assert e["profile"] == "local-cpu" and e["fit"]["verdict"] == "fits"
    assert e["memory_settings"]["precision"] == "fp32"
    assert e["time"]["gpu_hours"] == 0 and e["time"]["seconds"] > 0


def test_time_is_6_psi_tokens_over_peak_mfu_gpus(full7b):
    tokens = 10**9
    t = est.time_estimate(full7b, tokens, "a100-80g-x8", "full", mfu=0.5)
    assert t["seconds"] == pytest.approx(6 * PSI_7B * tokens / (312e12 * 0.5 * 8))
    assert t["gpu_hours"] == pytest.approx(t["seconds"] * 8 / 3600)
    lora = est.count_parameters(LLAMA7B, {"type": "lora", "r": 32})
    tl = est.time_estimate(lora, tokens, "a100-80g-x8", "lora", mfu=0.5)
    assert tl["seconds"] / t["seconds"] == pytest.approx(4 / 6, rel=0.02)
    assert any("40%" in a for a in est.time_estimate(full7b, tokens, "h200-141g-1", "full")["assumptions"])


def test_estimate_is_json_and_formats():
    spec = finetune(LLAMA7B, {"type": "lora", "r": 32, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
                    steps=1000, micro_batch=4)
    e = est.estimate(spec, "a100-80g-1")
    assert json.loads(json.dumps(e)) == e
    text = est.format_estimate(e)
    assert "79,953,920" in text and "GiB" in text and "GPU-hours" in text
    # The share printed beside a total is of that total (what a reader computes); the base's is named.
    p = e["parameters"]
    assert f"({100 * p['trainable'] / p['total']:.2f}% of the total; 1.19% of the base's" in text
    assert e["time"]["tokens"] == 1000 * 4 * 1 * 512


def test_sizes_are_printed_in_a_unit_that_shows_them():
    assert describe.size(3 * GIB) == "3.00 GiB"
    assert describe.size(9.29 * 2**20) == "9.29 MiB"
    assert describe.size(518.75 * 1024) == "518.75 KiB"
    e = est.estimate(finetune(TINY, {"type": "lora", "r": 8}, gpus=0, cpus=1, micro_batch=8), None)
    text = est.format_estimate(e)
    assert "0.00 GiB" not in text and "KiB" in text and "MiB" in text
