"""B6: the planner's memory prediction against the measured peak of one training step (CPU: fp32,
bf16 autocast, gradient checkpointing, gradient accumulation).

What is measured: the peak of live tensor bytes during one steady-state training step, the same
quantity the planner predicts (model states + activations + logits; no Python/torch runtime, no
allocator slack). The step is the one jobs/finetune.py runs, built from the same code:
`jobs.components.build_model` + `apply_strategy` (+ `jobs.precision.enable_checkpointing`), AdamW
over the trainable parameters, and `jobs.precision.Stepper` for the optimizer step: per micro-batch
forward (under autocast for bf16) -> zero_grad(set_to_none=True) after the first -> backward, then
optimizer.step() after the last.

Method: two warm-up steps create the optimizer state. At the start of the measured step the live
bytes are counted exactly (unique storages of parameters, gradients and optimizer state; nothing
else is held between steps). The step then runs under torch.profiler with profile_memory=True,
which records every CPU allocator allocation and free; the running sum of those deltas, added to
the starting bytes, is the live-bytes curve, and its maximum is the measured peak. The step before
the measured one is profiled as well, so every tensor freed during the measured step was allocated
under the profiler (a free of a block allocated before profiling is not reported).

Predicted: `launcher.planner.estimate(spec, "local-cpu")["memory"]["total"]` for the same spec.
Goal: predicted within +-15% of measured for every case.

Run: python -m bench.b6_memory   (about a minute on two cores; writes bench/results/b6_memory.json)
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TOLERANCE = 0.15

LORA = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
# (name, strategy, micro_batch, seq_len, model.config overrides)
CASES = [
    ("full b16 s48", {"type": "full"}, 16, 48, {}),
    ("lora-r8 b16 s48 (configs/tiny/lora.yaml)", LORA, 16, 48, {}),
    ("full b4 s128", {"type": "full"}, 4, 128, {}),
    ("lora-r8 b8 s96", LORA, 8, 96, {}),
    ("lora-r8 q,v b32 s64", {**LORA, "target_modules": ["q_proj", "v_proj"]}, 32, 64, {}),
    ("lora-r8 dropout 0.1 b8 s64", {**LORA, "dropout": 0.1}, 8, 64, {}),
    ("full eager attention b4 s128", {"type": "full"}, 4, 128, {"attn_implementation": "eager"}),
    # Model states dominate and the optimizer step's temporaries set the peak, not the activations.
    ("full vocab 32000 b1 s16", {"type": "full"}, 1, 16, {"vocab_size": 32000}),
    ("full h256 vocab 4000 b4 s64", {"type": "full"}, 4, 64,
     {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 8, "num_key_value_heads": 8,
      "vocab_size": 4000}),
]
# Issue 15's training settings (train.*): (name, strategy, micro_batch, seq_len, model.config, train)
TRAIN_CASES = [
    ("full b4 s128 grad checkpointing", {"type": "full"}, 4, 128, {}, {"grad_checkpointing": True}),
    ("lora-r8 b8 s96 grad checkpointing", LORA, 8, 96, {}, {"grad_checkpointing": True}),
    ("full b4 s128 bf16 autocast", {"type": "full"}, 4, 128, {}, {"precision": "bf16"}),
    ("lora-r8 b8 s96 bf16 autocast", LORA, 8, 96, {}, {"precision": "bf16"}),
    ("lora-r8 b8 s96 bf16 + checkpointing", LORA, 8, 96, {}, {"precision": "bf16", "grad_checkpointing": True}),
    ("full b4 s128 accumulation 3", {"type": "full"}, 4, 128, {}, {"grad_accumulation": 3}),
]


def _spec(strategy: dict, micro_batch: int, seq_len: int, config: dict, train: dict | None = None) -> dict:
    config = dict(config)
    attn = config.pop("attn_implementation", "sdpa")  # the spec field the job reads
    return {
        "kind": "finetune",
        "name": "b6",
        "model": {"source": "tiny-llama", "config": config, "seq_len": seq_len, "num_labels": None,
                  "attn_implementation": attn},
        "strategy": dict(strategy),
        "train": {"max_steps": 1, "micro_batch": micro_batch, **(train or {})},
        "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
    }


def _state_bytes(model, optimizer) -> int:
    """Live bytes held between steps: parameters, their gradients, optimizer state (unique storages)."""
    import torch

    seen = {}

    def add(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()

    for p in model.parameters():
        add(p)
        if p.grad is not None:
            add(p.grad)
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                add(v)
    return sum(seen.values())


def measure(spec: dict, seed: int = 0) -> dict:
    """Peak live tensor bytes of one steady-state training step of this spec (see the module doc)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from jobs import components as C
    from jobs import precision as P

    torch.set_num_threads(1)
    train = spec["train"]
    model = C.apply_strategy(C.build_model(spec["model"], seed=seed), spec["strategy"])
    if train.get("grad_checkpointing"):
        P.enable_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    accumulation = train.get("grad_accumulation", 1)
    stepper = P.Stepper(model, optimizer, precision=P.resolve(train.get("precision"), 0),
                        accumulation=accumulation, grad_clip=None)
    b, s = spec["train"]["micro_batch"], spec["model"]["seq_len"]
    gen = torch.Generator().manual_seed(seed)
    vocab = spec["model"]["config"].get("vocab_size", 259)
    ids = torch.randint(3, vocab,
                        (b, s), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def step():  # as jobs/finetune.py: one optimizer step of `accumulation` micro-batches
        for _ in range(accumulation):
            update = stepper.micro_step(lambda: model(**batch).loss)
        return update.loss

    step()
    start = _state_bytes(model, optimizer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        assert _state_bytes(model, optimizer) == start  # steady state: the same bytes between steps
        with record_function("b6_measured_step"):
            step()
    events = list(prof.profiler.kineto_results.events())
    mark = next(e for e in events if e.name() == "b6_measured_step")
    t0, t1 = mark.start_ns(), mark.start_ns() + mark.duration_ns()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and t0 <= e.start_ns() <= t1)
    live = peak = 0
    for _, n in deltas:
        live += n
        peak = max(peak, live)
    return {
        "states_bytes": start,
        "peak_bytes": start + peak,
        "step_end_delta": live,  # 0: everything the step allocated was freed again
        "attn_implementation": model.config._attn_implementation,
        "allocation_events": len(deltas),
    }


def run() -> dict:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from launcher.planner import estimate

    rows = []
    for name, strategy, b, s, config, train in [(*c, {}) for c in CASES] + TRAIN_CASES:
        spec = _spec(strategy, b, s, config, train)
        started = time.time()
        measured = measure(spec)
        mem = estimate(spec, "local-cpu")["memory"]
        states = mem["weights"] + mem["gradients"] + mem["optimizer"]
        # Baseline: the estimator's previous activation formula (Korthikanti et al., 16-bit, x2 for
        # fp32, + fp32 logits), on the same model states.
        d = estimate(spec, "local-cpu")["parameters"]["dims"]
        h, a, layers, vocab = d["hidden_size"], d["num_heads"], d["num_layers"], d["vocab_size"]
        korthikanti = states + layers * s * b * h * (34 + 5 * a * s / h) * 2 + s * b * vocab * 4
        rows.append({
            "case": name,
            "strategy": strategy["type"],
            "micro_batch": b,
            "seq_len": s,
            "attention": measured["attn_implementation"],
            "train": train,
            "predicted_bytes": mem["total"],
            "measured_bytes": measured["peak_bytes"],
            "ratio": round(mem["total"] / measured["peak_bytes"], 4),
            "korthikanti_ratio": round(korthikanti / measured["peak_bytes"], 4),
            "predicted_states_bytes": states,
            "measured_states_bytes": measured["states_bytes"],
            # above the model states: activations, or the optimizer step's temporaries where larger
            "predicted_above_states_bytes": mem["total"] - states,
            "measured_above_states_bytes": measured["peak_bytes"] - measured["states_bytes"],
            "predicted_optimizer_step_temp_bytes": mem["optimizer_step_temp"],
            "activation_terms": mem["activation_terms"],
            "step_end_delta": measured["step_end_delta"],
            "seconds": round(time.time() - started, 1),
        })
    ratios = [r["ratio"] for r in rows]
    worst = max(ratios, key=lambda x: abs(x - 1))
    result = {
        "bench": "b6_memory",
        "goal": f"predicted/measured within 1 +- {TOLERANCE:g} for every case",
        "ratio": worst,
        "ok": all(abs(x - 1) <= TOLERANCE for x in ratios),
        "method": (
            "peak of live tensor bytes in one steady-state training step (forward, "
            "zero_grad(set_to_none=True), backward, AdamW step; jobs.components build_model + "
            "apply_strategy, jobs.precision.Stepper), CPU (fp32, bf16 autocast, checkpointing, "
            "accumulation): exact bytes of parameters, gradients and AdamW state at the step's "
            "start plus the running sum of torch.profiler(profile_memory=True) allocator events during "
            "the step; excludes the Python/torch runtime and allocator slack"
        ),
        "predicted": "launcher.planner.estimate(spec, 'local-cpu')['memory']['total']",
        "cases": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "b6_memory.json").write_text(json.dumps(result, indent=2))
    return result


def table(result: dict) -> str:
    lines = ["| case | attention | predicted | measured | ratio | previous formula ratio | states pred/meas "
             "| above states pred/meas |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["cases"]:
        lines.append(
            f"| {r['case']} | {r['attention']} | {r['predicted_bytes'] / 2**20:.2f} MiB | "
            f"{r['measured_bytes'] / 2**20:.2f} MiB | {r['ratio']:.3f} | {r['korthikanti_ratio']:.3f} | "
            f"{r['predicted_states_bytes'] / 2**20:.2f} / {r['measured_states_bytes'] / 2**20:.2f} MiB | "
            f"{r['predicted_above_states_bytes'] / 2**20:.2f} / {r['measured_above_states_bytes'] / 2**20:.2f} MiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    out = run()
    print(table(out))
    print(f"worst ratio {out['ratio']}, goal {out['goal']}: {'met' if out['ok'] else 'NOT met'}")
