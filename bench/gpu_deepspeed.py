"""GPU check of engine: deepspeed: ZeRO-2 and ZeRO-3 (bf16, nccl, world size 1) against ZeRO-0.

A standalone script (no Ray): the same DeepSpeed config generator (launcher/dsconfig.py) and the
same model and engine code as the job (jobs/deepspeed_finetune.py) train a ~200M-parameter Llama.
It records peak GPU memory and tokens/s per setting, the ratios against ZeRO-0 measured in the
same run, and the planner's prediction (launcher/planner/) for the same settings.

    python bench/gpu_deepspeed.py [--out bench/results/gpu_deepspeed.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "gpu_deepspeed.json"
MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=1024)
SETTINGS = [  # (label, zero_stage, activation_checkpointing); the first is the baseline
    ("zero0", 0, False),
    ("zero2", 2, False),
    ("zero3", 3, False),
    ("zero3_actckpt", 3, True),
]


def spec_for(stage: int, act_ckpt: bool, micro_batch: int, seq_len: int, steps: int) -> dict:
    return {
        "kind": "finetune",
        "engine": "deepspeed",
        "deepspeed": {"zero_stage": stage},
        "strategy": {"type": "full"},
        "model": {"source": "tiny-llama", "config": MODEL, "seq_len": seq_len},
        "train": {"micro_batch": micro_batch, "lr": 3e-4, "seed": 0, "grad_clip": 1.0,
                  "warmup_steps": 0, "weight_decay": 0.0, "max_steps": steps, "precision": "bf16",
                  "grad_checkpointing": act_ckpt},
        "resources": {"workers": 1, "cpus_per_worker": 8, "gpus_per_worker": 1},
    }


def batches(micro_batch: int, seq_len: int, n: int):
    import torch

    from jobs import components as C

    texts = []
    for i in range(micro_batch * n):
        start = (i * 37) % 5000
        texts.append(" ".join(str(start + k) for k in range(seq_len // 4)))
    enc = C.tokenize_causal({"text": texts}, "text", seq_len)
    return [{k: torch.from_numpy(v[j:j + micro_batch]) for k, v in enc.items()}
            for j in range(0, len(texts), micro_batch)]


def run(steps: int = 20, warmup: int = 3, micro_batch: int = 16, seq_len: int = 512,
        out: Path = RESULT) -> dict:
    import torch

    from jobs import deepspeed_finetune as D
    from launcher.dsconfig import prepare
    from launcher.planner import estimate

    D.init_distributed(on_gpu=True)
    data = batches(micro_batch, seq_len, warmup + steps)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "steps": steps, "micro_batch": micro_batch, "seq_len": seq_len, "settings": {}}
    import deepspeed

    results["deepspeed"] = deepspeed.__version__
    for label, stage, act_ckpt in SETTINGS:
        spec = spec_for(stage, act_ckpt, micro_batch, seq_len, steps)
        config = prepare(spec)
        est = estimate(spec, "h200-141g-1")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        engine = D.build_engine(D.build_model(spec), spec, world=1)
        losses = [D.micro_step(engine, b) for b in data[:warmup]]
        torch.cuda.synchronize()
        started = time.perf_counter()
        losses += [D.micro_step(engine, b) for b in data[warmup:]]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        tokens = sum(int(b["attention_mask"].sum()) for b in data[warmup:])
        peak = torch.cuda.max_memory_allocated()
        params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
        results["settings"][label] = {
            "zero_stage": stage,
            "activation_checkpointing": act_ckpt,
            "ds_config": config,
            "parameters": params,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "tokens_per_s": tokens / seconds,
            "step_s": seconds / steps,
            "peak_mem_gib": peak / 2**30,
            "predicted_mem_gib": est["memory"]["total"] / 2**30,
            "predicted_model_states_gib": est["memory"]["model_states"] / 2**30,
            "predicted_activations_gib": est["memory"]["activations"] / 2**30,
            "predicted_time": est["time"],
        }
        print(label, json.dumps({k: v for k, v in results["settings"][label].items() if k != "ds_config"}),
              flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    base = results["settings"]["zero0"]
    for row in results["settings"].values():
        row["tokens_per_s_vs_zero0"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["peak_mem_vs_zero0"] = row["peak_mem_gib"] / base["peak_mem_gib"]
        row["measured_over_predicted_mem"] = row["peak_mem_gib"] / row["predicted_mem_gib"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    run(steps=args.steps, out=args.out)
