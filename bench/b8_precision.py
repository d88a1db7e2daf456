"""B8: bf16 autocast / fp32 optimizer steps per second on this CPU (issue 15; reported, no goal).

The same tiny model (tiny-llama), the same tokenized rows and the same step as jobs/finetune.py:
`jobs.components.build_model` + `apply_strategy`, AdamW, `jobs.precision.Stepper` (forward under the
precision's autocast, backward, clip, step). Each precision runs `steps` timed steps after warm-up,
alternating fp32 / bf16 `repeats` times on one thread; the ratio is of the medians.

Run: python -m bench.b8_precision   (about a minute on two cores; writes bench/results/b8_precision.json)
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LORA = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
CASES = [("full", {"type": "full"}), ("lora-r8", LORA)]
MICRO_BATCH, SEQ_LEN = 16, 48  # configs/tiny/lora.yaml's


def _batches(train_path: Optional[str], n: int) -> list[dict]:
    import torch

    from jobs import components as C

    if train_path:
        import pyarrow.parquet as pq

        texts = pq.read_table(train_path, columns=["text"]).column("text").to_pylist()[: n * MICRO_BATCH]
    else:  # the demo's training text (launcher/synthetic.py counting)
        from launcher.synthetic import counting

        texts = counting(n * MICRO_BATCH, seed=0).column("text").to_pylist()
    out = []
    for i in range(n):
        enc = C.tokenize_causal({"text": texts[i * MICRO_BATCH:(i + 1) * MICRO_BATCH]}, "text", SEQ_LEN)
        out.append({k: torch.from_numpy(v) for k, v in enc.items()})
    return out


def steps_per_s(strategy: dict, precision: str, batches: list[dict], steps: int, warmup: int = 3) -> float:
    import torch

    from jobs import components as C
    from jobs import precision as P

    model = C.apply_strategy(C.build_model({"source": "tiny-llama", "seq_len": SEQ_LEN}, seed=0), strategy).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    stepper = P.Stepper(model, optimizer, precision=precision, grad_clip=1.0)

    def run(n):
        for i in range(n):
            batch = batches[i % len(batches)]
            stepper.micro_step(lambda: model(**batch).loss)

    run(warmup)
    started = time.perf_counter()
    run(steps)
    return steps / (time.perf_counter() - started)


def run(train_path: Optional[str] = None, steps: int = 30, repeats: int = 3) -> dict:
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    batches = _batches(train_path, 8)
    cases = []
    for name, strategy in CASES:
        rates = {"fp32": [], "bf16": []}
        for _ in range(repeats):
            for precision in rates:
                rates[precision].append(steps_per_s(strategy, precision, batches, steps))
        fp32, bf16 = statistics.median(rates["fp32"]), statistics.median(rates["bf16"])
        cases.append({"case": name, "fp32_steps_per_s": round(fp32, 2), "bf16_steps_per_s": round(bf16, 2),
                      "ratio": round(bf16 / fp32, 3),
                      "runs": {k: [round(v, 2) for v in vs] for k, vs in rates.items()}})
    result = {
        "bench": "b8_precision",
        "goal": "report (no goal): bf16 autocast / fp32 optimizer steps/s on this CPU",
        "ratio": min(c["ratio"] for c in cases),
        "cases": cases,
        "setup": f"tiny-llama, micro_batch {MICRO_BATCH}, seq_len {SEQ_LEN}, 1 thread, {steps} steps x "
                 f"{repeats} alternating runs per precision (median), jobs.precision.Stepper",
        "cpu_bf16_support": _cpu_bf16(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "b8_precision.json").write_text(json.dumps(result, indent=2))
    return result


def _cpu_bf16() -> str:
    """Whether this CPU has native bf16 instructions (AVX512-BF16 / AMX), which autocast needs to gain."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(found) or "none (bf16 is emulated: expect it slower than fp32)"


if __name__ == "__main__":
    out = run()
    for c in out["cases"]:
        print(f"{c['case']}: fp32 {c['fp32_steps_per_s']} steps/s, bf16 {c['bf16_steps_per_s']} steps/s, "
              f"ratio {c['ratio']}")
    print(f"cpu bf16: {out['cpu_bf16_support']}")
