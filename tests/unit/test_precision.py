"""The torch engine's step settings (issue 15 item 5): bf16 autocast, gradient accumulation (with DDP's
all-reduce on the last micro-batch only), gradient checkpointing, a 16-bit frozen base for adapters,
the attention kernel; and their refusals. Real tiny models, in-process."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from jobs import components as C
from jobs import precision as P
from launcher.errors import ConfigError
from launcher.spec import load_spec

warnings.filterwarnings("ignore", category=FutureWarning)
LORA = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
MODEL = {"source": "tiny-llama", "seq_len": 16}


def batch_of(rows: int, seed: int = 0, seq: int = 16) -> dict:
    ids = torch.randint(3, 259, (rows, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def model_for(strategy, checkpointing=False, seed=0):
    model = C.apply_strategy(C.build_model(MODEL, seed=seed), strategy)
    if checkpointing:
        P.enable_checkpointing(model)
    return model.train()


def spec(**parts) -> dict:
    base = {"kind": "finetune", "name": "p", "strategy": LORA, "data": {"train": "/nowhere/train.parquet"},
            "train": {"max_steps": 4}, "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}}
    for key, value in parts.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) and key != "strategy" else value
    return base


def test_bf16_autocast_trains_on_cpu_and_computes_in_bf16():
    torch.manual_seed(0)
    model = model_for({"type": "full"})
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stepper = P.Stepper(model, optimizer, precision="bf16", grad_clip=1.0)
    batch = batch_of(8)
    losses = [stepper.micro_step(lambda: model(**batch).loss, 128).loss for _ in range(30)]
    assert seen[0] == torch.bfloat16  # the head ran under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    assert losses[-1] < 0.5 * losses[0], losses


def test_n_accumulated_micro_batches_give_the_gradient_of_one_n_times_batch():
    big = batch_of(8, seed=3)
    grads = {}
    for n in (1, 4):
        model = model_for({"type": "full"})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # gradients stay, weights do not move
        stepper = P.Stepper(model, optimizer, accumulation=n)
        rows = 8 // n
        updates = [stepper.micro_step(lambda i=i: model(**{k: v[i * rows:(i + 1) * rows] for k, v in big.items()}).loss,
                                      rows * 16) for i in range(n)]
        assert all(u is None for u in updates[:-1]) and updates[-1] is not None  # one optimizer step
        assert updates[-1].count == 8 * 16
        grads[n] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[4][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_accumulation_all_reduces_once_per_optimizer_step_under_ddp(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        reductions = []
        for n in (1, 3):
            ddp = torch.nn.parallel.DistributedDataParallel(model_for(LORA))
            calls = []

            def hook(state, bucket):
                calls.append(1)
                fut = torch.futures.Future()
                fut.set_result(bucket.buffer())
                return fut

            ddp.register_comm_hook(None, hook)
            stepper = P.Stepper(ddp, torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad]),
                                accumulation=n)
            for i in range(n):
                batch = batch_of(2, seed=i)
                stepper.micro_step(lambda: ddp(**batch).loss)
            reductions.append(len(calls))
        assert reductions[0] >= 1 and reductions[1] == reductions[0]  # 3 micro-batches, one all-reduce
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", [{"type": "full"}, LORA, {"type": "prompt", "num_virtual_tokens": 4},
                                      {"type": "ia3"}], ids=lambda s: s["type"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(strategy):
    batch, out = batch_of(4, seed=1), []
    for checkpointing in (False, True):
        model = model_for(strategy, checkpointing)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        assert inner.is_activation_checkpointing == checkpointing  # really on (and off)
        loss = model(**batch).loss
        loss.backward()
        out.append((float(loss.detach()),
                    {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss0, g0), (loss1, g1) = out
    assert loss0 == pytest.approx(loss1, abs=1e-6)
    assert set(g0) == set(g1) and g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_prefix_tuning_with_checkpointing_is_refused_one_line():
    with pytest.raises(ConfigError) as err:
        load_spec(spec(strategy={"type": "prefix"}, train={"grad_checkpointing": True}))
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("train.grad_checkpointing: strategy prefix cannot train with it (")
    assert load_spec(spec(strategy={"type": "prefix"})).train.grad_checkpointing is False


def test_fp16_on_cpu_is_refused_one_line_at_validate_and_by_the_stepper():
    with pytest.raises(ConfigError) as err:
        load_spec(spec(train={"precision": "fp16"}))
    assert err.value.problems == ["train.precision: fp16 needs a GPU (gpus_per_worker > 0); use bf16 or fp32"]
    model = model_for(LORA)
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        P.Stepper(model, torch.optim.AdamW(model.parameters()), precision="fp16")


def test_flash_attention_without_the_package_is_refused_one_line(monkeypatch):
    import importlib.util

    from launcher.jobplan import plan

    with pytest.raises(ConfigError) as err:  # on CPU workers: no kernel at all
        load_spec(spec(model={"attn_implementation": "flash_attention_2"}))
    assert err.value.problems == [
        "model.attn_implementation: flash_attention_2 needs a GPU (gpus_per_worker > 0); use sdpa"]
    gpu = spec(model={"attn_implementation": "flash_attention_2"}, resources={"gpus_per_worker": 1})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        plan(load_spec(copy.deepcopy(gpu)), "local", preflight=False)
    assert len(err.value.problems) == 1 and "flash_attention_2 needs the flash-attn package" in err.value.problems[0]
    with pytest.raises(ValueError, match="flash_attention_2 needs the flash-attn package"):  # on the cluster
        C.build_model({**MODEL, "attn_implementation": "flash_attention_2"})


def test_attention_implementation_reaches_the_model():
    for attn in ("eager", "sdpa"):
        assert C.build_model({**MODEL, "attn_implementation": attn}).config._attn_implementation == attn


def test_adapters_load_a_16bit_base_on_gpus_and_keep_their_own_weights_fp32():
    def typed(**parts):
        return load_spec(spec(**parts))

    assert P.base_dtype(typed(resources={"gpus_per_worker": 1})) == torch.bfloat16
    assert P.base_dtype(typed(resources={"gpus_per_worker": 1}, train={"precision": "fp32"})) is None
    assert P.base_dtype(typed(resources={"gpus_per_worker": 1}, strategy={"type": "full"})) is None
    assert P.base_dtype(typed()) is None  # CPU: fp32
    model = C.apply_strategy(C.build_model(MODEL, dtype=torch.bfloat16), LORA)
    P.trainable_in_fp32(model)
    dtypes = {p.requires_grad: p.dtype for p in model.parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    with P.autocast("bf16", "cpu"):
        loss = model(**batch_of(2)).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_planner_plans_accumulation_checkpointing_and_the_torch_engines_precision():
    from launcher.planner import estimate

    def est(**train):
        s = load_spec(spec(train={"micro_batch": 4, **train}, resources={"workers": 2})).model_dump(mode="json")
        return estimate(s, "local-cpu")

    plain, accum, ckpt, bf16 = est(), est(grad_accumulation=4), est(grad_checkpointing=True), est(precision="bf16")
    assert accum["memory_settings"]["effective_batch"] == 4 * 4 * 2
    assert accum["time"]["tokens"] == 4 * plain["time"]["tokens"]  # max_steps counts optimizer steps
    assert accum["time"]["seconds_per_step"] == pytest.approx(4 * plain["time"]["seconds_per_step"])
    assert ckpt["memory"]["activations"] < plain["memory"]["activations"]
    assert ckpt["time"]["flops"] > plain["time"]["flops"]  # the recomputed forward
    # autocast keeps fp32 weights, gradients and AdamW states (no 16-bit master split)
    assert bf16["memory"]["weights"] == plain["memory"]["weights"]
    assert bf16["memory_settings"]["precision"] == "bf16" and bf16["memory_settings"]["autocast"]


def test_a_step_leaves_its_loss_on_the_device_and_the_report_reads_the_window_once(tmp_path):
    """No host sync per step (issue 18, B3): the update's loss is a 0-d tensor, not a float, and
    the loop's record averages the window's tensors to the same float a per-step read gave."""
    from jobs.loop import Loop

    model, batch = model_for({"type": "full"}), batch_of(8)
    stepper = P.Stepper(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    loop = Loop(tmp_path, total_steps=3, report_every=3)
    updates = [stepper.micro_step(lambda: model(**batch).loss, 8) for _ in range(3)]
    for u in updates:
        assert isinstance(u.loss, torch.Tensor) and u.loss.dim() == 0 and not u.loss.requires_grad
        loop.add(u.loss, u.count)
    record = loop.record(3)
    assert isinstance(record["loss"], float)
    assert record["loss"] == pytest.approx(sum(float(u.loss) for u in updates) / 3, rel=1e-6)
