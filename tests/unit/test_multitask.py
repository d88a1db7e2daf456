"""kind: multitask in-process (no Ray): spec, plan, packed-training isolation, registry, swap."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from common.runfolder import PROGRESS
from launcher import registry as R
from launcher.errors import ConfigError, PlanError
from launcher.jobplan import plan
from launcher.kinds.multitask import task_settings, typed_task_settings
from launcher.spec import load_spec

SEQ = 80  # the plain instruction template takes ~55 byte-level tokens before the response


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    from launcher import synthetic

    out = tmp_path_factory.mktemp("mt-data")
    paths = {}
    for name in ("counting", "alphabet", "instruction"):
        paths[name] = {"train": str(synthetic.make(name, 600, out / name, 0, "train")),
                       "eval": str(synthetic.make(name, 32, out / name, 9, "eval"))}
    return paths


def mt_spec(task_data, tmp_path, **extra):
    task_data = copy.deepcopy(task_data)
    spec = {
        "kind": "multitask", "name": "mt", "storage": str(tmp_path / "runs"),
        "model": {"source": "tiny-llama", "seq_len": SEQ},
        "strategy": {"type": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 6, "micro_batch": 8, "lr": 0.01, "report_every": 3, "eval_batches": 1},
        "tasks": [
            {"name": "counting", "data": task_data["counting"]},
            {"name": "alphabet", "data": task_data["alphabet"], "lora": {"r": 8}},
            {"name": "instruction", "data": {"task": "instruction", **task_data["instruction"]},
             "train": {"max_steps": 4, "lr": 0.02}},
        ],
    }
    spec.update(extra)
    return spec


# ---------------------------------------------------------------------------------------------
# Spec and plan


def test_spec_errors_name_the_task_field_and_fix(task_data, tmp_path):
    spec = mt_spec(task_data, tmp_path)
    spec["tasks"][1]["name"] = "counting"
    with pytest.raises(ConfigError, match="task names must be unique; rename counting"):
        load_spec(spec)
    spec = mt_spec(task_data, tmp_path)
    spec["tasks"][2]["lora"] = {"rr": 2}
    spec["tasks"][0]["train"] = {"lr": 5}
    with pytest.raises(ConfigError) as err:
        load_spec(spec)
    text = str(err.value)
    assert "tasks.2.lora.rr: unknown key; did you mean 'tasks.2.lora.r'?" in text
    assert "tasks.0.train.lr: Input should be less than 1 (got 5)" in text

    bad = mt_spec(task_data, tmp_path)
    bad["tasks"][0]["data"]["task"] = "ner"
    with pytest.raises(ConfigError, match="data.task 'ner' cannot train a causal-LM adapter"):
        load_spec(bad)
    dropout = mt_spec(task_data, tmp_path, packing=True)
    dropout["tasks"][0]["lora"] = {"dropout": 0.1}
    with pytest.raises(ConfigError, match="packed training needs lora dropout 0"):
        load_spec(dropout)


def test_plan_checks_each_task_fills_its_steps_and_counts_workers(task_data, tmp_path):
    spec = mt_spec(task_data, tmp_path)
    spec["tasks"][0]["train"] = {"max_steps": None, "epochs": 2}
    spec["train"]["max_steps"] = None
    job = plan(load_spec(spec), "local", submission_id="p1")
    assert job.data["counting.train"]["rows"] == 600 and job.data["alphabet.eval"]["rows"] == 32
    steps = {t["name"]: task_settings(job.spec, t)["train"]["max_steps"] for t in job.spec["tasks"]}
    # counting: 2 epochs of 600 rows at 8 per step; alphabet: 1 epoch; instruction: its own 4
    assert steps == {"counting": 150, "alphabet": 75, "instruction": 4}
    assert job.resources["workers"] == 3 and job.spec["packing"] is False
    assert job.estimate["multitask"]["packed_vs_separate"] < 1

    missing = mt_spec(task_data, tmp_path)
    missing["tasks"][1]["data"]["train"] = str(tmp_path / "nope.parquet")
    with pytest.raises(ConfigError, match="tasks.alphabet: data.train: .*nope.parquet does not exist"):
        plan(load_spec(missing), "local")


def test_train_precision_runs_bf16_on_gpus_by_default_and_fp16_is_refused(task_data, tmp_path):
    """Mode adapters runs train.precision: planned (and trained, jobs/adapter_train.py) in bf16 on
    GPUs unless set, fp32 on CPU; fp16 is refused before anything runs (no loss scaler)."""
    gpu = mt_spec(task_data, tmp_path, resources={"gpus_per_worker": 1, "cpus_per_worker": 1})
    assert plan(load_spec(gpu), "ray", profile="a100-80g-1").estimate["memory_settings"]["precision"] == "bf16"
    assert plan(load_spec(mt_spec(task_data, tmp_path)), "local").estimate["memory_settings"]["precision"] == "fp32"
    cpu_bf16 = mt_spec(task_data, tmp_path)
    cpu_bf16["train"]["precision"] = "bf16"
    assert plan(load_spec(cpu_bf16), "local").spec["train"]["precision"] == "bf16"
    gpu["train"]["precision"] = "fp16"
    with pytest.raises(ConfigError, match="train.precision: fp16 is not run by kind multitask .*; use bf16 or fp32"):
        load_spec(gpu)


def test_planner_packs_when_one_gpu_per_adapter_does_not_fit(task_data, tmp_path):
    spec = mt_spec(task_data, tmp_path, packing="auto", resources={"gpus_per_worker": 1, "cpus_per_worker": 1})
    job = plan(load_spec(spec), "ray", profile="a100-80g-1")  # 3 adapters, one GPU
    assert job.spec["packing"] is True and job.resources["workers"] == 1
    why = next(w for w in job.warnings if w.startswith("packing: auto -> "))
    ratio = job.estimate["multitask"]["packed_vs_separate"]
    assert why == ("packing: auto -> true: only 1 of the 3 adapter workers run at once; "
                   f"packed fits in {ratio:.2f}x the memory") and ratio < 1
    forced = mt_spec(task_data, tmp_path, packing=False, resources={"gpus_per_worker": 1, "cpus_per_worker": 1})
    waves = plan(load_spec(forced), "ray", profile="a100-80g-1")  # one GPU: one adapter at a time
    assert waves.spec["packing"] is False
    assert "a100-80g-1 holds 1 at a time, so they run in 3 waves" in " ".join(waves.warnings)
    tiny_gpu = mt_spec(task_data, tmp_path, resources={"gpus_per_worker": 2, "cpus_per_worker": 1})
    with pytest.raises(PlanError, match="an adapter worker .* cannot be placed: each worker asks 2 GPUs"):
        plan(load_spec(tiny_gpu), "ray", profile="a100-80g-1")
    small = {"cpus_per_worker": 0.4, "data_cpus_per_worker": 0.2}  # 3 x 0.6 CPU: all at once on 2 CPUs
    local = plan(load_spec(mt_spec(task_data, tmp_path, packing="auto", resources=small)), "local")
    assert local.spec["packing"] is False and local.resources["workers"] == 3
    assert "packing: auto -> false: one base per worker fits, all 3 at once (packed fits in" in " ".join(local.warnings)
    # Tasks the packed engine cannot stack (unequal micro-batches) are never packed by auto,
    # and packing: true is refused for them at validate, naming the fix.
    uneven = mt_spec(task_data, tmp_path, packing="auto", resources={"gpus_per_worker": 1, "cpus_per_worker": 1})
    uneven["tasks"][0]["train"] = {"micro_batch": 4}
    kept = plan(load_spec(uneven), "ray", profile="a100-80g-1")
    assert kept.spec["packing"] is False
    assert ("packing: auto -> false: the packed engine cannot run these tasks (packed training needs one equal "
            "train.micro_batch for every task (got counting 4, alphabet 8, instruction 8)") in " ".join(kept.warnings)
    uneven["packing"] = True
    with pytest.raises(ConfigError, match="one equal train.micro_batch .* set one value; or set packing: false"):
        load_spec(uneven)


def test_a_multitask_job_that_cannot_fit_is_refused_with_fixes_it_can_take(task_data, tmp_path):
    """The per-task fixes come from the finetune planner: only those a multitask spec runs are
    offered (mode adapters runs train.grad_checkpointing; never train.precision), with their overrides."""
    big = {"source": "tiny-llama", "seq_len": 512, "config": {
        "hidden_size": 1024, "num_hidden_layers": 8, "intermediate_size": 4096,
        "num_attention_heads": 8, "num_key_value_heads": 8}}
    spec = mt_spec(task_data, tmp_path, model=big)
    spec["train"]["micro_batch"] = 512
    with pytest.raises(PlanError) as err:
        plan(load_spec(spec), "local")
    message = str(err.value)
    assert "3 adapter workers: does-not-fit on profile local-cpu" in message and "\n" not in message
    assert message.endswith("would fit: gradient checkpointing + micro_batch=1: train.grad_checkpointing=true "
                            "train.micro_batch=1; micro_batch=1: train.micro_batch=1")
    assert "precision" not in message
    # The fix it offers is one the job runs: gradient checkpointing in both layouts.
    spec["train"].update(micro_batch=1, grad_checkpointing=True)
    job = plan(load_spec(spec), "local")
    assert job.estimate["memory_settings"]["grad_checkpointing"] is True


# ---------------------------------------------------------------------------------------------
# Training in-process: the same functions the Ray workers run


@pytest.fixture(scope="module")
def trained(task_data, tmp_path_factory):
    """Each task trained alone (its own base copy) and all packed on one base, same data."""
    from jobs import adapter_train as A
    from jobs import multitask as M
    from jobs.artifacts import RunDir

    root = tmp_path_factory.mktemp("mt-runs")
    spec = load_spec(mt_spec(task_data, root))
    tasks = [typed_task_settings(spec, t) for t in spec.tasks]
    alone_dir, packed_dir = RunDir(str(root / "alone")), RunDir(str(root / "packed"))
    base = M.prepare_base(spec, alone_dir)
    M.prepare_base(spec, packed_dir)
    alone = {t.name: A.train_adapter(t, base, M.arrow_stream(t, SEQ), str(alone_dir.path), SEQ)
             for t in tasks}
    packed = A.train_packed(tasks, str(packed_dir.path / "base"),
                            {t.name: M.arrow_stream(t, SEQ) for t in tasks}, str(packed_dir.path), SEQ)
    for name, entry in alone.items():
        R.register(alone_dir.path, name, entry, M.base_record(spec, base), M.TOKENIZER_DIR)
    return {"spec": spec, "tasks": tasks, "alone": alone, "packed": packed,
            "alone_dir": alone_dir.path, "packed_dir": packed_dir.path}


def _adapter_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_each_adapter_learns_its_task_and_packed_equals_alone(trained):
    for name, entry in trained["alone"].items():
        assert entry["eval"]["eval_loss"] < entry["eval"]["eval_loss_before"] - 0.05, (name, entry)
        assert entry["steps"] == (4 if name == "instruction" else 6)
        assert trained["packed"][name]["packed"] and trained["packed"][name]["steps"] == entry["steps"]
        # One base, K adapters, one forward per step: each adapter ends where it would alone.
        a = _adapter_weights(trained["alone_dir"] / "adapters" / name)
        p = _adapter_weights(trained["packed_dir"] / "adapters" / name)
        assert a.keys() == p.keys()
        for key in a:
            torch.testing.assert_close(p[key], a[key], rtol=1e-4, atol=1e-5)
    # the base the adapters were trained on is the same bits in both layouts
    assert {e["base_sha256"] for e in [*trained["alone"].values(), *trained["packed"].values()]} == {
        trained["alone"]["counting"]["base_sha256"]}


def test_each_worker_says_where_its_time_went_with_the_first_step_apart_from_the_steady_ones(trained):
    # B5 reads its steady tokens/s from data_wait + compute: the steps after the first
    packed = [e["phases_s"] for e in trained["packed"].values()]
    assert all(p is packed[0] for p in packed)  # a pack is one worker: one clock, in each entry
    for phases in [*packed, *(e["phases_s"] for e in trained["alone"].values())]:
        assert set(phases) >= {"load", "first_step", "compute", "export"}, phases
        assert all(seconds >= 0 for seconds in phases.values()), phases


def test_packed_step_updates_only_the_adapters_whose_rows_are_in_the_batch(trained):
    from peft import get_peft_model

    from jobs import adapter_train as A
    from jobs import multitask as M
    from jobs.data.ingest import endless
    from jobs.packed_lora import PackedLora

    tasks = trained["tasks"]
    base, _ = A.load_base(str(trained["packed_dir"] / "base"), "cpu")
    frozen = {n: p.clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, A.lora_config(tasks[0].lora), adapter_name=tasks[0].name)
    for t in tasks[1:]:
        model.add_adapter(t.name, A.lora_config(t.lora))
    params = {t.name: A.adapter_params(model, t.name) for t in tasks}
    for group in params.values():
        for p in group:
            p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": g, "lr": 0.05} for g in params.values()])
    model.train()
    streams = {t.name: endless(M.arrow_stream(t, SEQ)) for t in tasks}
    with PackedLora(model) as pack:
        # Step 1 with every task: all three adapters get momentum. Step 2 without 'alphabet'.
        A.packed_step(pack, opt, {n: next(s) for n, s in streams.items()}, params, {}, "cpu")
        snap = {n: [p.detach().clone() for p in g] for n, g in params.items()}
        A.packed_step(pack, opt, {n: next(streams[n]) for n in ("counting", "instruction")}, params, {}, "cpu")
        assert all(p.grad is None for p in params["alphabet"])
        assert all(torch.equal(a, b) for a, b in zip(params["alphabet"], snap["alphabet"]))  # bit-identical
        for n in ("counting", "instruction"):
            assert any(not torch.equal(a, b) for a, b in zip(params[n], snap[n])), n
        # Unequal micro-batches cannot share the stacked matmuls: refused, naming the fix.
        short = {k: v[:4] for k, v in next(streams["alphabet"]).items()}
        with pytest.raises(ValueError, match="one equal micro-batch per task"):
            A.packed_step(pack, opt, {"counting": next(streams["counting"]), "alphabet": short}, params, {}, "cpu")

        # A task's gradient depends on its own rows only: swapping the other task's rows changes nothing.
        batch = {n: next(streams[n]) for n in ("counting", "instruction")}
        other = next(streams["alphabet"])

        def grads(batches):
            opt.zero_grad(set_to_none=True)
            cat = {k: torch.cat([b[k] for b in batches.values()]) for k in ("input_ids", "attention_mask", "labels")}
            with pack.rows(list(batches)):
                logits = model(input_ids=cat["input_ids"], attention_mask=cat["attention_mask"]).logits
                loss, mask = A.token_losses(logits, cat["labels"])
                start, total = 0, 0
                for b in batches.values():
                    r = len(b["input_ids"])
                    total = total + (loss[start:start + r] * mask[start:start + r]).sum() / mask[start:start + r].sum()
                    start += r
                total.backward()
            return [p.grad.clone() for p in params["counting"]]

        with_instruction = grads(batch)
        with_alphabet = grads({"counting": batch["counting"], "alphabet": other})
    for a, b in zip(with_instruction, with_alphabet):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    base_now = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                for n, p in model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base_now[n], frozen[n]) for n in frozen)  # the shared base never moves


# ---------------------------------------------------------------------------------------------
# Registry and swap at inference


def test_registry_records_and_detects_a_changed_adapter(trained):
    reg = R.load_registry(trained["alone_dir"])
    assert set(reg["adapters"]) == {"counting", "alphabet", "instruction"}
    entry = reg["adapters"]["counting"]
    assert entry["path"] == "adapters/counting" and entry["bytes"] > 0 and len(entry["sha256"]) == 64
    assert entry["base_sha256"] and entry["created"].endswith("Z") and entry["eval"]["eval_loss"] > 0
    assert reg["base"] == {"id": "tiny-llama", "path": "base", "config": {}}
    assert R.intact(trained["alone_dir"], entry)
    tampered = copy.deepcopy(entry)
    tampered["sha256"] = "0" * 64
    assert not R.intact(trained["alone_dir"], tampered)


def test_swap_and_mixed_batch_equal_each_adapter_loaded_alone(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from launcher.inference import AdapterSet

    run = trained["alone_dir"]
    texts = ["count from 41: 41 42", "letters from c: c d", "sort: 5 2 9\n2 5"]
    names = ["counting", "alphabet", "instruction"]
    adapters = AdapterSet(run)  # the base once, all three adapters
    alone = {}
    for name in names:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"),
                                          run / "adapters" / name).eval()
        enc = adapters.encode(texts, seq_len=24)
        with torch.no_grad():
            alone[name] = model(**enc).logits
    for name in names:  # set_adapter, in an order unlike the loading order
        torch.testing.assert_close(adapters.logits(texts, task=name, seq_len=24), alone[name], rtol=0, atol=1e-5)
    mixed = adapters.logits(texts, tasks=names, seq_len=24)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=0, atol=1e-5)
    # the adapters differ from one another (the swap is not a no-op)
    assert not torch.allclose(alone["counting"], alone["alphabet"], atol=1e-3)
    # generate's first greedy token is the argmax of the same logits
    first = adapters.generate([texts[0]], task="counting", max_new_tokens=1)[0]
    whole = adapters.logits([texts[0]], task="counting")
    assert first == adapters.tokenizer.decode([int(whole[0, -1].argmax())]) or whole[0, -1].argmax() == 2


def test_cli_adapters_list_and_infer(trained, capsys):
    from launcher.cli.main import main
    from launcher.inference import AdapterSet

    assert main(["adapters", "list", str(trained["alone_dir"]), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["task"] for r in rows) == ["alphabet", "counting", "instruction"]
    assert main(["adapters", "list", "--storage", str(trained["alone_dir"].parent)]) == 0
    assert capsys.readouterr().out.count("alone") == 3
    assert main(["infer", str(trained["alone_dir"]), "--task", "counting", "--input", "count from 1:",
                 "--max-new-tokens", "4"]) == 0
    answer = AdapterSet(trained["alone_dir"]).generate(["count from 1:"], task="counting", max_new_tokens=4)[0]
    assert capsys.readouterr().out == answer + "\n"  # the answer only, as the Python API gives it
    assert main(["infer", str(trained["alone_dir"]), "--input", "count from 1:"]) == 1
    assert "name one with --task" in capsys.readouterr().err
    # A misspelled task is refused before any model loads, with the near name.
    assert main(["infer", str(trained["alone_dir"]), "--task", "countin", "--input", "x"]) == 1
    assert "--task 'countin': run alone has no such adapter; did you mean 'counting'?" in capsys.readouterr().err


def _dies_after(stream, batches: int):
    """The task's stream, ending the worker (an exception) after `batches` batches."""
    def one_pass():
        for i, batch in enumerate(stream()):
            if i == batches:
                raise RuntimeError("worker died")
            yield batch
    return one_pass


@pytest.mark.parametrize("packed", [False, True])
def test_a_task_that_dies_continues_from_its_last_report(trained, tmp_path, packed):
    """Killed after step 4 (reports every 3): the rerun restores step 3's adapter and optimizer,
    keeps the step-3 record, and ends at the planned steps with each report once."""
    from jobs import adapter_train as A
    from jobs import multitask as M

    tasks = [t for t in trained["tasks"] if t.name != "instruction"]  # 6 steps each, report every 3
    base = str(trained["alone_dir"] / "base")
    run = str(tmp_path)
    streams = {t.name: M.arrow_stream(t, SEQ) for t in tasks}
    key = M.PACKED if packed else f"task-{tasks[0].name}"

    def train(s):
        if packed:
            return A.train_packed(tasks, base, s, run, SEQ)
        return {tasks[0].name: A.train_adapter(tasks[0], base, s[tasks[0].name], run, SEQ)}

    with pytest.raises(RuntimeError, match="worker died"):
        train({n: _dies_after(s, 4) for n, s in streams.items()})
    saved = torch.load(tmp_path / PROGRESS / f"{key}.pt", weights_only=False)
    assert set(saved["steps"].values()) == {3}
    first = {n: [json.loads(x) for x in (tmp_path / f"metrics-{n}.jsonl").read_text().splitlines()]
             for n in saved["steps"]}
    assert all([r["step"] for r in recs] == [3] for recs in first.values())

    entries = train(streams)
    for name, entry in entries.items():
        records = [json.loads(x) for x in (tmp_path / f"metrics-{name}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [3, 6] and records[0] == first[name][0]
        assert entry["steps"] == 6 and entry["eval"]["eval_loss_before"] == saved["before"][name]
        assert entry["eval"]["eval_loss"] < entry["eval"]["eval_loss_before"]


def _with_train(task, **train):
    return task.model_copy(update={"train": task.train.model_copy(update=train)})


@pytest.mark.parametrize("packed", [False, True])
def test_warmup_raises_each_adapters_lr_linearly_and_continues_after_a_restart(trained, tmp_path, monkeypatch,
                                                                                packed):
    """train.warmup_steps is honoured per adapter (finetune's linear warmup), by the adapter's own
    step: a worker that restarts from its progress file goes on where the warmup was."""
    from jobs import adapter_train as A
    from jobs import multitask as M

    counting, alphabet = (t for t in trained["tasks"] if t.name in ("counting", "alphabet"))
    tasks = [_with_train(counting, warmup_steps=4, max_steps=6, report_every=2)]
    if packed:  # a second adapter without warmup: its lr is its own from the first step
        tasks.append(_with_train(alphabet, warmup_steps=0, max_steps=6, report_every=2))
    lrs = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):  # the real AdamW step; the lrs it ran with are kept
        lrs.append([g["lr"] for g in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    base, run = str(trained["alone_dir"] / "base"), str(tmp_path)
    streams = {t.name: M.arrow_stream(t, SEQ) for t in tasks}

    def train(s):
        if packed:
            return A.train_packed(tasks, base, s, run, SEQ)
        return A.train_adapter(tasks[0], base, s[tasks[0].name], run, SEQ)

    with pytest.raises(RuntimeError, match="worker died"):  # dies in step 4, after the step-2 report
        train({n: _dies_after(s, 3) for n, s in streams.items()})
    train(streams)
    lr = tasks[0].train.lr
    warm = [lr / 4, lr / 2, 3 * lr / 4] + [lr, lr, lr]
    # steps 1-3, then (restarted from step 2) steps 3-6
    assert [round(x[0], 12) for x in lrs] == [round(x, 12) for x in warm[:3] + warm[2:]]
    if packed:
        assert all(x[1] == tasks[1].train.lr for x in lrs)
