"""Specs and models the planner tests share (not a test module)."""

from pathlib import Path

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
