"""The planner's closed-form counts (no torch) equal the meta-device counts, for every shipped
config's model and strategy, every catalogue model, every `ftlaunch model make` family, and the
config settings that change a table (tied heads, biases, grouped KV heads, head_dim); and a plan
of a catalogue or folder model imports no torch at all (issue 18, B1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
import yaml

from launcher.planner import closed_form
from launcher.planner.counts import count_parameters

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = [
    {"type": "full"},
    {"type": "freeze", "freeze_first_layers": 1},
    {"type": "lora", "r": 8, "target_modules": "all-linear"},
    {"type": "qlora", "r": 4},
]


def meta_counts(model: dict, strategy: dict) -> dict:
    """The counts with closed forms off: the model built on the meta device, adapters by peft."""
    saved = closed_form.table_for
    closed_form.table_for = lambda *a, **k: None
    try:
        return count_parameters.__wrapped__(model, strategy)
    finally:
        closed_form.table_for = saved


def closed_counts(model: dict, strategy: dict) -> dict:
    config = closed_form.config_dict(model)
    assert config and closed_form.table_for(config, model.get("num_labels")), f"no table for {model}"
    return count_parameters.__wrapped__(model, strategy)


def shipped_pairs() -> list:
    """(model, strategy) of every shipped finetune-shaped config (stages and variants included)."""
    pairs = []

    def walk(node):
        if isinstance(node, dict):
            model = node.get("model")
            if isinstance(model, dict) and not str(model.get("source", "")).startswith("arrcoc"):
                strategy = node.get("strategy") or {"type": "full"}
                if not str(model.get("source", "tiny-llama")).startswith("hf:") and "type" in strategy:
                    pairs.append((model, strategy))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        walk(yaml.safe_load(path.read_text()))
    return pairs


@pytest.mark.parametrize("model,strategy", shipped_pairs(), ids=lambda x: json.dumps(x, sort_keys=True)[:60])
def test_every_shipped_config_counts_the_same_without_torch(model, strategy):
    model = {k: v for k, v in model.items() if k in ("source", "config", "num_labels")}
    if strategy["type"] in ("prompt", "prefix", "ia3"):  # peft counts these: the table is not used
        assert closed_form.config_dict(model) is not None
        strategy = {"type": "lora", "r": 8}
    assert closed_counts(model, strategy) == meta_counts(model, strategy)


MODELS = [
    {"source": "tiny-llama"},
    {"source": "tiny-llama", "num_labels": 3},
    {"source": "tiny-llama", "config": {"tie_word_embeddings": True, "num_key_value_heads": 2}},
    {"source": "tiny-llama", "config": {"attention_bias": True, "mlp_bias": True, "head_dim": 8}},
    {"source": "llama-2-7b"},
    {"source": "minilm"},
    {"source": "minilm", "num_labels": 4},
]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s["type"])
@pytest.mark.parametrize("model", MODELS, ids=lambda m: json.dumps(m, sort_keys=True)[:50])
def test_catalogue_models_count_the_same_without_torch(model, strategy):
    assert closed_counts(model, strategy) == meta_counts(model, strategy)


@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral"])
def test_made_model_folders_count_the_same_without_torch(made_model, family):
    model = {"source": f"hf:{made_model(family)}"}
    for strategy in STRATEGIES + [{"type": "lora", "r": 16, "target_modules": ["q_proj", "v_proj"]}]:
        assert closed_counts(model, strategy) == meta_counts(model, strategy), strategy
    # A config.json that leaves keys out gets the config class's defaults, as transformers does.
    config = json.loads((Path(made_model(family)) / "config.json").read_text())
    built_default = transformers.CONFIG_MAPPING[config["model_type"]]()
    for key, default in closed_form.DEFAULTS[config["model_type"]].items():
        built = getattr(built_default, key, None)
        assert default is None or built == default, (key, default, built)


def test_bert_defaults_are_the_config_class_defaults():
    built = transformers.BertConfig()
    assert all(getattr(built, k) == v for k, v in closed_form.DEFAULTS["bert"].items())


def test_what_the_table_cannot_count_goes_to_the_meta_device():
    # LoRA aimed at the output head, and peft's own adapters: peft counts them.
    lm_head = {"type": "lora", "r": 4, "target_modules": ["q_proj", "lm_head"]}
    assert closed_form.config_dict({"source": "tiny-llama"})
    assert count_parameters.__wrapped__({"source": "tiny-llama"}, lm_head) == meta_counts({"source": "tiny-llama"},
                                                                                           lm_head)
    assert closed_form.table_for({"model_type": "gpt2", "n_embd": 64}) is None
    assert closed_form.table_for({"model_type": "llama", "quantization_config": {"bits": 4}}) is None


def test_a_plan_of_a_catalogue_model_or_a_folder_imports_no_torch(made_model, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"count {i} {i + 1} {i + 2}"}) for i in range(600)))
    for source in ("tiny-llama", f"hf:{made_model('qwen2')}"):
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump({
            "kind": "finetune", "name": "b1", "model": {"source": source, "seq_len": 32},
            "strategy": {"type": "lora", "r": 8}, "data": {"task": "causal_lm", "train": str(data)},
            "train": {"max_steps": 5, "micro_batch": 4}, "storage": str(tmp_path / "runs")}))
        code = ("import sys; from launcher.cli.main import main\n"
                f"sys.argv = ['ftlaunch', 'plan', {str(spec)!r}]\n"
                "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
                "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "parameters  total" in out.stdout and out.stdout.strip().endswith("NO-TORCH"), out.stdout[-1500:]
