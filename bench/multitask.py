"""Bench B4/B5 for `kind: multitask`. `python -m bench.multitask [--k 2 4] [--steps 30]`.

B4 fan-out parallel efficiency: K adapter workers (Ray remote tasks, each streaming its own
task through Ray Data) run at once vs the same K run one after another on the same head;
efficiency = T_sequential / (K x T_parallel). Goal >= 0.9 with K = the cores available.
B5 packed (the packed engine, jobs/packed_lora.py) vs one base per worker, each layout in a fresh
process of its own: peak memory above the process's baseline after imports (CUDA:
max_memory_allocated; CPU: peak RSS), and training throughput (steady tokens/s: the steps after
the first, by the worker's own phase clock, jobs/adapter_train.py `Phases`; both layouts given
the same cores; the whole worker's wall figure beside it), on a base where the weights matter
(~104M parameters) with gradient checkpointing on in both layouts, so activations do not hide
the shared weights. Goals: memory <= 0.6x, throughput >= 1.0x, for each K asked. Results go to
bench/results/multitask.json, misses included.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "multitask.json"
NAMES = ("counting", "alphabet", "instruction", "counting2")
# A base big enough that its weights, not the interpreter or the activations, dominate a
# worker's memory: hidden 1024 x 8 layers, ~104M parameters.
BASE_CONFIG = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
               "num_attention_heads": 16, "num_key_value_heads": 16}


def _tasks(work: Path, k: int, steps: int, micro: int, base: str | None = None) -> list:
    """The K tasks as the typed settings an adapter worker trains by (what the job passes it);
    `base`: a model folder whose own tokenizer encodes them (else the catalogue's tiny-llama's)."""
    from launcher import synthetic
    from launcher.kinds.multitask import TaskSettings
    from launcher.spec import ModelSpec

    tasks = []
    for i, name in enumerate(NAMES[:k]):
        gen = "instruction" if name == "instruction" else ("alphabet" if name == "alphabet" else "counting")
        path = work / name / "train.parquet"
        if not path.is_file():  # made once by the parent: children running at once only read it
            path = synthetic.make(gen, 2000, work / name, seed=i, split="train")
        tasks.append({"name": name, "data": {"task": "instruction" if gen == "instruction" else "causal_lm",
                                             "train": str(path), "eval": None, "columns": {}},
                      "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
                      "train": {"max_steps": steps, "micro_batch": micro, "lr": 1e-3, "weight_decay": 0.0,
                                "grad_clip": 1.0, "report_every": steps, "eval_batches": 0, "seed": i,
                                "grad_checkpointing": True}})
    model = ModelSpec(source=f"hf:{base}") if base else ModelSpec()
    return [TaskSettings.model_validate({**t, "lora": {"type": "lora", **t["lora"]}, "model": model}) for t in tasks]


def _base(work: Path, config: dict) -> str:
    from jobs import components as C

    # A stable name: hash() of a str differs per process (PYTHONHASHSEED), and every child
    # process would build (and time) its own base.
    path = work / ("base-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16])
    if not path.is_dir():
        C.build_model({"source": "tiny-llama", "config": config}, seed=0).save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# B4


def b4_fanout(work: Path, k: int, steps: int, micro: int, seq_len: int) -> dict:
    from cluster import local

    os.environ["FTLAUNCH_HOME"] = str(work / "home")
    local.client_env()  # before Ray is imported: loopback stays loopback
    import ray

    from jobs import multitask as M

    head = local.up(num_cpus=k)
    try:
        ray.init(address=head.gcs_address, log_to_driver=False)
        tasks = _tasks(work, k, steps, micro)
        base = _base(work, BASE_CONFIG)  # compute, not per-step overhead, should dominate
        from launcher.spec import ModelSpec

        context = {"model": ModelSpec(seq_len=seq_len), "base": base, "env": {},
                   "cpus": 1, "gpus": 0, "data_cpus": 0.2, "preemption_grace_s": 30.0}

        def fresh(phase: str) -> dict:
            """A run folder per phase: a worker finding a task's progress file continues from it
            (jobs/multitask_progress.py), and a phase that only reloads finished tasks times nothing."""
            run_dir = work / f"b4-run-{os.getpid()}-{phase}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            return {**context, "run_dir": str(run_dir)}

        # Each worker holds 0.8 of a core and its data stream 0.2: the layout the planner makes
        # (resources.cpus_per_worker + resources.data_cpus_per_worker per running worker).
        remote = ray.remote(num_cpus=1 - context["data_cpus"], max_retries=0)(M._worker)
        warm = fresh("warm")
        ray.get([remote.remote([t], warm) for t in tasks])  # warm: worker processes, imports

        finished: dict = {"sequential": [], "parallel": []}
        phases: dict = {"sequential": {}, "parallel": {}}  # summed over the K workers, per phase

        def timed(phase, groups):
            ctx = fresh(phase)
            t0 = time.perf_counter()
            for group in groups:
                pending = [remote.remote([t], ctx) for t in group]
                while pending:  # each task's end, from the phase's start: an early finisher idles its core
                    done, pending = ray.wait(pending, num_returns=1)
                    finished[phase].append(round(time.perf_counter() - t0, 2))
                    result = ray.get(done[0])
                    assert all(r["status"] == "SUCCEEDED" for r in result.values()), result
                    for r in result.values():
                        for what, seconds in r["entry"].get("phases_s", {}).items():
                            phases[phase][what] = round(phases[phase].get(what, 0.0) + seconds, 2)
            return time.perf_counter() - t0

        sequential = timed("sequential", [[t] for t in tasks])
        before = _cpu_seconds()
        parallel = timed("parallel", [tasks])
        shares = {role: round(max(0.0, seconds - before.get(role, 0.0)) / (k * parallel), 3)
                  for role, seconds in _cpu_seconds().items()}
    finally:
        ray.shutdown()  # before the head goes: a driver that outlives its GCS aborts, traceback unprinted
        local.down()
    eff = sequential / (k * parallel)
    return {"k": k, "cores": k, "steps_per_task": steps, "sequential_s": round(sequential, 2),
            "parallel_s": round(parallel, 2), "speedup": round(sequential / parallel, 3),
            "parallel_efficiency": round(eff, 3), "goal": ">= 0.9", "met": eff >= 0.9,
            # what the K cores were spent on while the K ran at once (shares of k x parallel_s)
            "cpu_share_during_parallel": shares, "idle_share_during_parallel": round(1 - sum(shares.values()), 3),
            "task_ends_s": finished, "machine_k_process_efficiency": machine_scaling(k),
            "machine_k_process_efficiency_training": machine_scaling(k, "train", (base, 4, micro, seq_len)),
            # inside the workers: base load, waits on the data stream, forward/backward/step,
            # reports, export (seconds summed over the K); what grows from sequential to parallel
            "worker_phases_s": phases}


def _matmul_seconds(rounds: int = 20) -> float:
    """A compute-bound kernel in one thread (a 1024 -> 2816 projection of 256 rows)."""
    import torch

    torch.set_num_threads(1)
    a, w = torch.randn(256, 1024), torch.randn(2816, 1024)
    t = time.perf_counter()
    for _ in range(rounds * 16):
        (a @ w.T).sum()
    return time.perf_counter() - t


def _train_seconds(base: str, steps: int, micro: int, seq_len: int, barrier=None) -> float:
    """The fan-out worker's compute, no Ray and no data stream: LoRA steps (all-linear r 8,
    gradient checkpointing, one thread) on the bench base, random token rows."""
    import torch
    from peft import LoraConfig, get_peft_model

    from jobs import adapter_train as A

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _ = A.load_base(base, "cpu")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (micro, seq_len))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm
    if barrier is not None:
        barrier.wait()  # the K start their timed steps together
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t


def _scaling_child(queue, barrier, kind, args) -> None:
    queue.put(_matmul_seconds() if kind == "matmul" else _train_seconds(*args, barrier=barrier))


def machine_scaling(k: int, kind: str = "matmul", args: tuple = ()) -> float:
    """This machine's own K-process efficiency, no Ray: one process's time alone over the slowest
    of K running the same at once. `matmul`: a cache-resident kernel (what the cores give);
    `train`: the fan-out worker's own LoRA steps (what the cores and the memory give this
    workload: B4's ceiling here). B4's anchor is linear."""
    import multiprocessing as mp

    spawn = mp.get_context("spawn")
    if kind == "matmul":
        _matmul_seconds(2)
        alone = _matmul_seconds()
    else:
        alone = _train_seconds(*args)
    queue, barrier = spawn.Queue(), spawn.Barrier(k)
    procs = [spawn.Process(target=_scaling_child, args=(queue, barrier, kind, args)) for _ in range(k)]
    for proc in procs:
        proc.start()
    each = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    return round(alone / max(each), 3)


def _cpu_seconds() -> dict:
    """CPU seconds (user + system) so far of this machine's processes by role: Ray's own
    (raylet, GCS, dashboard and its agents, log monitor), Ray worker processes (the adapter
    workers and their data tasks), this bench process, everything else."""
    import psutil

    totals: dict = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        times, cmd = proc.info["cpu_times"], " ".join(proc.info["cmdline"] or [proc.info["name"] or ""])
        if times is None:
            continue
        if proc.info["pid"] == os.getpid():
            role = "bench_driver"
        elif "default_worker.py" in cmd or cmd.startswith("ray::"):
            role = "ray_workers"
        elif any(x in cmd for x in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py",
                                    "runtime_env", "agent")):
            role = "ray_system"
        else:
            role = "other"
        totals[role] = totals.get(role, 0.0) + times.user + times.system
    return totals


# ---------------------------------------------------------------------------------------------
# B5: one layout per fresh process


def _measure(layout: str, k: int, steps: int, micro: int, seq_len: int, work: str, threads: int,
             base: str | None = None) -> dict:
    """Child process: train `layout` ('packed' or 'one') and report memory and tokens/s."""
    import resource

    import torch

    from jobs import adapter_train as A
    from jobs import multitask as M

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tasks = _tasks(Path(work), k, steps, micro, base)
    base = base or _base(Path(work), BASE_CONFIG)
    run_dir = Path(tempfile.mkdtemp(dir=work))
    streams = {t.name: M.arrow_stream(t, seq_len) for t in tasks}
    for s in streams.values():  # tokenize outside the timed window
        next(iter(s()))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import peft  # noqa: F401  an import is no training: out of the timed window
    t0 = time.perf_counter()
    if layout == "packed":
        entries = A.train_packed(tasks, base, streams, str(run_dir), seq_len, device)
    else:
        entries = {tasks[0].name: A.train_adapter(tasks[0], base, streams[tasks[0].name], str(run_dir), seq_len,
                                                  device)}
    seconds = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_tasks = k if layout == "packed" else 1
    phases = next(iter(entries.values()))["phases_s"]  # a pack's are the one worker's
    # The steady state: every step after the first (data waits and compute), the worker's own clock.
    return {"device": device, "peak_bytes": peak - baseline, "seconds": seconds,
            "tokens": n_tasks * steps * micro * seq_len, "base_parameters": _parameters(base),
            "steady_seconds": phases.get("data_wait", 0.0) + phases.get("compute", 0.0),
            "steady_tokens": n_tasks * (steps - 1) * micro * seq_len, "phases_s": phases}


def _parameters(base: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    return sum(p.numel() for p in model.parameters())


def _child(layout, k, steps, micro, seq_len, work, threads, base=None) -> subprocess.Popen:
    code = (f"import json, bench.multitask as b; print('RESULT ' + json.dumps(b._measure("
            f"{layout!r}, {k}, {steps}, {micro}, {seq_len}, {str(work)!r}, {threads}, {base!r})))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"bench child failed (exit {proc.returncode}): {out[-2000:]}")
    return json.loads(lines[-1][7:])


def b5_packed(work: Path, k: int, steps: int, micro: int, seq_len: int, cores: int, base: str | None = None) -> dict:
    """`base`: a model folder (bench/gpu_lora.py's ~1B one), else the ~104M BASE_CONFIG."""
    # Memory: each layout alone in its process. Throughput: same cores for both layouts: the
    # K one-adapter workers run side by side (cores/K threads each), the pack gets all cores.
    work.mkdir(parents=True, exist_ok=True)
    if base is None:
        _base(work, BASE_CONFIG)
    _tasks(work, k, steps, micro, base)
    packed = _result(_child("packed", k, steps, micro, seq_len, work, cores, base))
    ones = [_child("one", k, steps, micro, seq_len, work, max(1, cores // k), base) for _ in range(k)]
    singles = [_result(p) for p in ones]
    # The bound on any one-process pack here: one adapter over the same K x micro rows, in one
    # process with the same cores. packed / ceiling is the engine's own cost of K adapters (1.0:
    # none); ceiling / separate is what one process gets from these cores against K processes.
    ceiling = _result(_child("one", 1, steps, k * micro, seq_len, work, cores, base))

    def steady(r: dict) -> float:  # tokens/s over the steps after the first, by the worker's clock
        return r["steady_tokens"] / r["steady_seconds"]

    packed_tps, ceiling_tps = steady(packed), steady(ceiling)
    separate_tps = sum(steady(s) for s in singles)  # each on its own cores, side by side
    # Wall: from the base's load to the last adapter's export (the start and end costs in).
    wall_packed = packed["tokens"] / packed["seconds"]
    wall_separate = sum(s["tokens"] for s in singles) / max(s["seconds"] for s in singles)
    mem_ratio = packed["peak_bytes"] / max(1, sum(s["peak_bytes"] for s in singles))
    thr_ratio = packed_tps / separate_tps
    return {
        "k": k, "device": packed["device"], "engine": "jobs/packed_lora.py", "base": base or BASE_CONFIG,
        "base_parameters": packed["base_parameters"], "grad_checkpointing": True, "steps": steps,
        "micro_batch": micro, "seq_len": seq_len, "cores": cores,
        "separate_threads_each": max(1, cores // k),
        # K separate processes on fewer cores than K: they time-share the cores, which a GPU
        # worker per adapter would not; the throughput ratio is then no like-for-like figure.
        "separate_oversubscribed": packed["device"] == "cpu" and k > cores,
        "memory_measure": "CUDA max_memory_allocated" if packed["device"] == "cuda"
        else "peak RSS above the post-import baseline, per process",
        "packed_peak_bytes": packed["peak_bytes"],
        "one_base_per_worker_peak_bytes": [s["peak_bytes"] for s in singles],
        "memory_ratio": round(mem_ratio, 3), "memory_goal": "<= 0.6 (ASPEN reports ~0.47)",
        "memory_met": mem_ratio <= 0.6,
        "throughput_measure": "steady state: tokens/s over the steps after the first (data waits and compute, "
                              "each worker's own clock); the separate workers' rates summed",
        "packed_tokens_per_s": round(packed_tps, 1),
        "separate_tokens_per_s": round(separate_tps, 1),
        "throughput_ratio": round(thr_ratio, 3), "throughput_goal": ">= 1.0", "throughput_met": thr_ratio >= 1.0,
        # the same over the whole worker: base load, first step, exports (each layout pays its own)
        "wall_packed_tokens_per_s": round(wall_packed, 1), "wall_separate_tokens_per_s": round(wall_separate, 1),
        "throughput_ratio_wall": round(wall_packed / wall_separate, 3),
        "phases_s": {"packed": packed["phases_s"], "separate": [s["phases_s"] for s in singles]},
        "one_process_ceiling_tokens_per_s": round(ceiling_tps, 1),
        "packed_vs_one_process_ceiling": round(packed_tps / ceiling_tps, 3),
        "one_process_ceiling_vs_separate": round(ceiling_tps / separate_tps, 3),
    }


def b5_median(work: Path, k: int, steps: int, micro: int, seq_len: int, cores: int, repeats: int) -> dict:
    """b5_packed `repeats` times (once where K > cores: oversubscribed, no like-for-like figure);
    the run of median throughput ratio, with every run's ratios beside it (the shared machine's
    noise moves one run by +-10%)."""
    runs = [b5_packed(work, k, steps, micro, seq_len, cores) for _ in range(repeats if k <= cores else 1)]
    chosen = sorted(runs, key=lambda r: r["throughput_ratio"])[len(runs) // 2]
    return {**chosen, "repeats": len(runs), "throughput_ratio_runs": [r["throughput_ratio"] for r in runs],
            "memory_ratio_runs": [r["memory_ratio"] for r in runs],
            "throughput_ratio_wall_runs": [r["throughput_ratio_wall"] for r in runs],
            "packed_vs_one_process_ceiling_runs": [r["packed_vs_one_process_ceiling"] for r in runs]}


def run(ks=(2,), steps: int = 30, micro: int = 16, seq_len: int = 64, which=("b4", "b5"), repeats: int = 1) -> dict:
    work = ROOT / "bench" / "work" / "multitask"
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 2
    result = {"host_cpus": cores, "load_avg_at_start": os.getloadavg()[0], "time": time.time()}
    if "b5" in which:  # one entry per K: "k2", "k4", ...
        result["b5_packed_vs_separate"] = {f"k{k}": b5_median(work, k, steps, micro, seq_len, min(cores, k), repeats)
                                           for k in ks}
    if "b4" in which:
        result["b4_fanout"] = b4_fanout(work, ks[0], steps, micro, seq_len)
    result["load_avg_at_end"] = os.getloadavg()[0]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    b5 = next(iter(result.get("b5_packed_vs_separate", {}).values()), {})
    key = "cuda" if b5.get("device") == "cuda" else "cpu"
    RESULTS.write_text(json.dumps({**previous, key: {**previous.get(key, {}), **result}}, indent=1))
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, nargs="+", default=[2], help="B5: one comparison per K; B4: the first K")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--only", choices=("b4", "b5"))
    ap.add_argument("--repeats", type=int, default=1, help="B5: runs per K (the median is reported)")
    a = ap.parse_args()
    print(json.dumps(run(a.k, a.steps, a.micro, a.seq_len, (a.only,) if a.only else ("b4", "b5"), a.repeats),
                     indent=1))
