"""The DeepSpeed job's pieces in-process (world size 1, gloo, DS_ACCELERATOR=cpu, no Ray).

ZeRO-0 and -1 with full fine-tuning and ZeRO-2 with LoRA: the loss falls, a checkpoint round trip
gives the same loss and the same next updates, and the export reloads to the same logits.
ZeRO-2 and -3 across two Ray Train workers are in test_deepspeed_ray.py.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def distributed():
    """One world-size-1 process group for this module; the environment is restored afterwards."""
    saved = dict(os.environ)
    from jobs import deepspeed_finetune as D

    D.init_distributed(on_gpu=False)
    yield D
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def spec_for(stage: int, strategy: str, accumulation: int = 1):
    from jobs.deepspeed_finetune import with_engine_defaults
    from launcher.spec import load_spec

    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
    spec = {
        "kind": "finetune", "name": "ds", "data": {"train": "unused.parquet"},
        "engine": "deepspeed",
        "deepspeed": {"zero_stage": stage},
        "strategy": {"type": strategy, **(lora if strategy == "lora" else {})},
        "model": {"source": "tiny-llama", "config": {}, "seq_len": 32},
        "train": {"micro_batch": 8, "lr": 3e-3 if strategy == "full" else 1e-2, "seed": 0,
                  "grad_clip": 1.0, "warmup_steps": 0, "weight_decay": 0.0, "grad_accumulation": accumulation},
        "resources": {"workers": 1, "gpus_per_worker": 0},
    }
    return with_engine_defaults(load_spec(spec))


def batches():
    from jobs import components as C

    texts = [f"count from {i}: " + " ".join(str(i + k) for k in range(6)) for i in range(48)]
    enc = C.tokenize_causal({"text": texts}, "text", 32)
    return texts, [{k: torch.from_numpy(v[j:j + 8]) for k, v in enc.items()} for j in range(0, 48, 8)]


@pytest.mark.parametrize("stage, strategy, accumulation", [(0, "full", 1), (1, "full", 2), (2, "lora", 1)])
def test_engine_trains_round_trips_and_exports(distributed, tmp_path, stage, strategy, accumulation):
    from jobs import components as C

    D = distributed
    spec = spec_for(stage, strategy, accumulation)
    texts, data = batches()
    engine = D.build_engine(D.build_model(spec), spec, world=1)
    assert engine.zero_optimization_stage() == stage
    loss_before = C.causal_lm_loss(engine.module, texts, 32)
    losses = [D.micro_step(engine, b) for _ in range(2) for b in data]
    steps = 12 // accumulation  # 12 micro-batches
    assert engine.global_steps == steps
    assert losses[-1] < losses[0] - 0.5, losses
    loss_after = C.causal_lm_loss(engine.module, texts, 32)
    assert loss_after < loss_before - 0.5

    # Checkpoint round trip: a fresh engine from the checkpoint has the same loss, and the same
    # next updates as the engine that kept going (optimizer state restored, not only weights).
    path = str(tmp_path / "checkpoint")
    D.save(engine, engine.global_steps, path)
    probe = C.probe(engine.module)
    continued = [D.micro_step(engine, b) for b in data[:4]]
    restored = D.build_engine(D.build_model(spec), spec, world=1)
    assert D.load(restored, path) == steps and restored.global_steps == steps
    assert C.causal_lm_loss(restored.module, texts, 32) == pytest.approx(loss_after, abs=1e-6)
    resumed = [D.micro_step(restored, b) for b in data[:4]]
    assert resumed == pytest.approx(continued, abs=1e-5)

    # Export: a plain transformers model (or a peft adapter) that reloads to the same logits.
    target = tmp_path / "export"
    D.export(path, spec, str(target))
    if strategy == "full":
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(target)
    else:
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(C.build_model(spec.model, seed=0), target)
        assert (target / "adapter_model.safetensors").exists()
    got = C.probe(reloaded)["logits"]
    torch.testing.assert_close(got, probe["logits"], rtol=0, atol=1e-5)
    untrained = C.probe(C.build_model(spec.model, seed=0))["logits"]
    assert not torch.allclose(got, untrained, atol=1e-2)
