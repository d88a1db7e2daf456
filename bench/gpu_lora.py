"""GPU checks of the performance issue (B3 and B5 on one GPU), in one run: on a lent device,
`bash bench/gpu_run.sh` (it installs what `bash bench/gpu_prepare.sh` packed here, then runs
this); where the packages are installed, `python -m bench.gpu_lora`. Without a GPU,
`python -m bench.gpu_lora --smoke` runs the same code on the CPU with a tiny model and few steps
(a check of the script before device time is spent on it; its figures mean nothing).

The model is a user's folder as `ftlaunch model make llama --size 1b` writes it (~1B parameters,
Llama-3.2-1B's shape, random init, its own tokenizer); LoRA r 16 on every linear layer; bf16
(the frozen base in bf16, the adapters in fp32, autocast); full rows of SEQ tokens, no padding.

B3: the finetune job's loop (submitted through the Ray Jobs API to a local head, one worker with
the GPU) against the same training as a plain PyTorch + peft loop in one process: steady-state
tokens/s of each (the job's reports after its first; the plain loop's windows after its first),
and the MFU of each, by the 6N rule and by what a frozen base computes (4N: no weight gradients),
against both the chip's dense bf16 peak and a bf16 GEMM measured here in the same run.
B5: K = 4 adapters packed on one base (jobs/packed_lora.py) against 4 processes training one
adapter each on the same GPU at the same time (bench/multitask.py's b5_packed): peak GPU memory
(max_memory_allocated, summed over the 4) and tokens/s.

Writes bench/results/gpu_lora.json (or --out): every figure, misses included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "bench" / "results" / "gpu_lora.json"
SEQ, MICRO, RANK = 512, 8, 16
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks (SXM)


def model_folder(work: Path, size: str) -> Path:
    from launcher.modelmake import make_model

    folder = work / f"llama-{size}"
    if not (folder / "config.json").is_file():
        make_model("llama", folder, size=size)
    return folder


def long_rows(work: Path, rows: int = 2000) -> str:
    """Text rows longer than SEQ tokens (runs of counting), so every row is SEQ tokens, unpadded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = work / "long.parquet"
    if not path.is_file():
        texts = [" ".join(str(i * 7 + j) for j in range(800)) for i in range(rows)]
        pq.write_table(pa.table({"text": texts}), path)
    return str(path)


def parameters(folder: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


def gemm_flops(device: str) -> float:
    """bf16 FLOP/s of an 8192^3 matrix product here: what this chip gives a large GEMM now."""
    import torch

    size = 8192 if device == "cuda" else 512
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * size ** 3 / (time.perf_counter() - t)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def lora_spec(folder: Path, train: str, steps: int, storage: Path, gpus: int) -> dict:
    return {
        "kind": "finetune", "name": "gpu-b3", "storage": str(storage),
        "model": {"source": f"hf:{folder}", "seq_len": SEQ},
        "strategy": {"type": "lora", "r": RANK, "alpha": 2 * RANK, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"task": "causal_lm", "train": train},
        "train": {"max_steps": steps, "micro_batch": MICRO, "lr": 1e-4, "report_every": 20, "eval_batches": 0,
                  "precision": "bf16", "warmup_steps": 0},
        "resources": {"workers": 1, "cpus_per_worker": 4 if gpus else 1, "gpus_per_worker": gpus},
    }


def ray_train_rate(spec: dict, work: Path) -> dict:
    """The finetune job through the Jobs API on a local head: its steady tokens/s (reports after
    the first, whose window holds the worker's start)."""
    from cluster import local

    os.environ["FTLAUNCH_HOME"] = str(work / "home")
    local.client_env()
    import launcher

    head = local.up(num_cpus=min(8, os.cpu_count() or 1))
    try:
        handle = launcher.submit(spec, "ray", address=head.address)
        status = handle.wait()
        if status != "SUCCEEDED":
            raise RuntimeError(f"the B3 job ended {status}: {handle.logs()[-3000:]}")
        records = [json.loads(x) for x in (Path(handle.run_dir) / "metrics.jsonl").read_text().splitlines()]
    finally:
        local.down()
    rates = [r["tokens_per_s"] for r in records[1:] if r.get("tokens_per_s")]
    return {"tokens_per_s": statistics.median(rates), "windows": [round(r) for r in rates],
            "first_window_s": round(records[0]["elapsed_s"], 2)}


def plain_rate(folder: Path, train: str, steps: int, device: str) -> dict:
    """The same LoRA training as a user would write it with PyTorch and peft, no Ray: the same rows
    (the job's own tokenization), bf16 base, fp32 adapters, autocast, AdamW, clipping 1.0."""
    import pyarrow.parquet as pq
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from jobs import text as T
    from launcher.spec import DataSpec, ModelSpec

    model_spec = ModelSpec(source=f"hf:{folder}", seq_len=SEQ)
    rows = pq.read_table(train).slice(0, MICRO * (steps + 1)).to_pydict()
    enc = T.encode_rows(rows, model_spec, DataSpec(task="causal_lm", train=train), SEQ)
    data = {k: torch.from_numpy(v).to(device) for k, v in enc.items()}
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if device == "cuda" else None).to(device)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                                            target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    rates, tokens, start = [], 0, time.perf_counter()
    for step in range(1, steps + 1):
        i = (step - 1) * MICRO % (len(data["input_ids"]) - MICRO)
        batch = {k: v[i:i + MICRO] for k, v in data.items()}
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tokens += MICRO * SEQ
        if step % 20 == 0:
            sync(device)
            now = time.perf_counter()
            rates.append(tokens / (now - start))
            tokens, start = 0, now
    return {"tokens_per_s": statistics.median(rates[1:]), "windows": [round(r) for r in rates]}


def mfu(tokens_per_s: float, n: int, peak: float, measured: float) -> dict:
    return {"mfu_6n": round(6 * n * tokens_per_s / peak, 4), "mfu_4n": round(4 * n * tokens_per_s / peak, 4),
            "mfu_6n_of_measured_gemm": round(6 * n * tokens_per_s / measured, 4)}


def run(size: str = "1b", steps: int = 120, b5_steps: int = 20, k: int = 4, out: Path = RESULT,
        smoke: bool = False) -> dict:
    import torch

    from bench import multitask

    if not torch.cuda.is_available() and not smoke:
        raise SystemExit("bench/gpu_lora.py needs a CUDA device; none is visible here (--smoke: a CPU check)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = ROOT / "bench" / "work" / ("gpu" if device == "cuda" else "gpu-smoke")
    work.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke: not a measurement)"
    peak = next((v for key, v in PEAK_BF16.items() if key in name), None)
    t0 = time.time()
    folder = model_folder(work, size)
    n = parameters(folder)
    result: dict = {"device": name, "torch": torch.__version__, "model": f"ftlaunch model make llama --size {size}",
                    "parameters": n, "seq_len": SEQ, "micro_batch": MICRO, "lora_r": RANK, "precision": "bf16",
                    "peak_bf16_flops": peak, "made_model_s": round(time.time() - t0, 1)}
    result["measured_gemm_bf16_flops"] = gemm_flops(device)
    peak = peak or result["measured_gemm_bf16_flops"]

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))

    train = long_rows(work)
    try:  # B3: each side's failure is recorded, and the other still runs
        plain = plain_rate(folder, train, steps, device)
        result["b3_plain"] = {**plain, **mfu(plain["tokens_per_s"], n, peak, result["measured_gemm_bf16_flops"])}
    except Exception as exc:  # noqa: BLE001 -- the bench records what failed and goes on
        result["b3_plain"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    save()
    try:
        job = ray_train_rate(lora_spec(folder, train, steps, work / "runs", int(device == "cuda")), work)
        result["b3_ray_train"] = {**job, **mfu(job["tokens_per_s"], n, peak, result["measured_gemm_bf16_flops"])}
    except Exception as exc:  # noqa: BLE001
        result["b3_ray_train"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    if "tokens_per_s" in result["b3_plain"] and "tokens_per_s" in result["b3_ray_train"]:
        ratio = result["b3_ray_train"]["tokens_per_s"] / result["b3_plain"]["tokens_per_s"]
        result["b3"] = {"ratio": round(ratio, 3), "goal": ">= 0.95", "met": ratio >= 0.95}
    save()
    try:
        b5 = multitask.b5_packed(work / "b5", k, b5_steps, MICRO, SEQ, cores=os.cpu_count() or 1, base=str(folder))
        b5["tokens_per_s_mfu_6n"] = round(6 * n * b5["packed_tokens_per_s"] / peak, 4)
        result["b5"] = b5
    except Exception as exc:  # noqa: BLE001
        result["b5"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    result["wall_s"] = round(time.time() - t0, 1)
    save()
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1b", help="ftlaunch model make's size (small: a quick try)")
    ap.add_argument("--steps", type=int, default=120, help="B3 steps per side (reports every 20)")
    ap.add_argument("--b5-steps", type=int, default=20)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--smoke", action="store_true", help="no GPU: the same code on the CPU, tiny and short")
    a = ap.parse_args()
    if a.smoke:
        a.size, a.steps, a.b5_steps, a.k = "tiny", 60, 3, 2
        a.out = a.out if a.out != RESULT else ROOT / "bench" / "work" / "gpu-smoke.json"
    print(json.dumps(run(a.size, a.steps, a.b5_steps, a.k, a.out, a.smoke), indent=1))
    sys.stdout.flush()
