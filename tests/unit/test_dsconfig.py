"""engine: deepspeed at validate and plan time: the spec block, the generated config, the lint."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from launcher.dsconfig import ds_config, prepare, problems
from launcher.errors import ConfigError, PlanError
from launcher.jobplan import plan
from launcher.spec import load_spec


def ds_spec(ds=None, strategy="full", gpus=0, workers=2, **train):
    return {
        "kind": "finetune",
        "name": "t-ds",
        "engine": "deepspeed",
        **({"deepspeed": ds} if ds is not None else {}),
        "strategy": {"type": strategy},
        "data": {"train": "/nonexistent/train.parquet"},
        "train": {"max_steps": 10, "micro_batch": 4, **train},
        "resources": {"workers": workers, "cpus_per_worker": 0.5, "gpus_per_worker": gpus},
    }


def prepared(spec: dict) -> dict:
    return load_spec(spec).model_dump(mode="json")


def test_spec_accepts_engine_deepspeed_and_names_a_bad_stage():
    spec = load_spec(ds_spec({"zero_stage": 3, "offload_optimizer": True, "offload_params": True}))
    assert spec.engine == "deepspeed" and spec.deepspeed.zero_stage == 3
    with pytest.raises(ConfigError) as err:
        load_spec(ds_spec({"zero_stage": 4}))
    assert "deepspeed.zero_stage" in str(err.value) and "4" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_spec(ds_spec({"zero_stag": 2}))
    assert "did you mean 'deepspeed.zero_stage'" in str(err.value)


def test_config_defaults_cpu_fp32_torch_adam_and_consistent_batch():
    spec = prepared(ds_spec({"zero_stage": 2}, workers=4, grad_accumulation=3))
    config = prepare(spec)
    assert spec["train"]["precision"] == "fp32"  # filled in: CPU workers
    assert "activation_checkpointing" not in config
    assert config["train_batch_size"] == 4 * 3 * 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["zero_optimization"] == {"stage": 2}
    assert config["optimizer"]["params"]["torch_adam"] is True  # no compiled op needed
    assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert config["gradient_clipping"] == 1.0


def test_config_gpu_defaults_bf16_and_offload_uses_deepspeed_cpu_adam():
    spec = prepared(ds_spec({"zero_stage": 3, "offload_optimizer": True, "offload_params": True}, gpus=1))
    config = prepare(spec)
    assert config["bf16"]["enabled"] and spec["train"]["precision"] == "bf16"
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "torch_adam" not in config["optimizer"]["params"]  # offload needs DeepSpeed's CPU Adam


@given(micro=st.integers(1, 64), accum=st.integers(1, 16), world=st.integers(1, 64))
def test_batch_arithmetic_always_holds(micro, accum, world):
    spec = {"deepspeed": {"zero_stage": 1},
            "train": {"micro_batch": micro, "lr": 1e-3, "precision": "fp32", "grad_accumulation": accum},
            "resources": {"workers": world}}
    config = ds_config(spec)
    assert config["train_batch_size"] == (
        config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * world
    )
    assert ds_config(spec, world_size=1)["train_batch_size"] == micro * accum


@pytest.mark.parametrize("ds, kwargs, reason", [
    ({"zero_stage": 2, "offload_params": True}, {}, "offload_params: needs ZeRO-3"),
    ({"zero_stage": 0, "offload_optimizer": True}, {}, "offload_optimizer: needs ZeRO"),
    ({}, {"gpus": 0.5}, "shares a GPU"),
])
def test_lint_refuses_what_cannot_work_with_the_reason(ds, kwargs, reason):
    spec = prepared(ds_spec(ds, **kwargs))
    found = problems(spec)
    assert any(reason in p for p in found), found
    with pytest.raises(PlanError, match=reason):
        plan(load_spec(ds_spec(ds, **kwargs)), preflight=False)


def test_lint_reports_every_problem_at_once():
    spec = prepared(ds_spec({"zero_stage": 0, "offload_params": True, "offload_optimizer": True}))
    assert len(problems(spec)) == 2


def test_train_settings_drive_the_config_and_the_old_block_fields_are_refused_one_line():
    spec = prepared(ds_spec({"zero_stage": 2}, gpus=1, precision="bf16", grad_accumulation=4,
                            grad_checkpointing=True))
    config = prepare(spec)
    assert config["bf16"]["enabled"] and config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 4 * 4 * 2 and "activation_checkpointing" in config
    for old, new in (("precision", "train.precision"), ("grad_accumulation", "train.grad_accumulation"),
                     ("activation_checkpointing", "train.grad_checkpointing")):
        with pytest.raises(ConfigError) as err:
            load_spec(ds_spec({"zero_stage": 1, old: 1 if old == "grad_accumulation" else "bf16"}))
        assert len(err.value.problems) == 1 and f"deepspeed.{old} is now {new}" in err.value.problems[0]


def test_fp16_on_cpu_is_refused_at_validate_with_one_line_on_either_engine():
    for engine in ("deepspeed", "torch"):
        spec = {**ds_spec(precision="fp16"), "engine": engine}
        with pytest.raises(ConfigError) as err:
            load_spec(spec)
        assert err.value.problems == [
            "train.precision: fp16 needs a GPU (gpus_per_worker > 0); use bf16 or fp32"]
    assert load_spec(ds_spec(precision="fp16", gpus=1)).train.precision == "fp16"


def test_lint_refuses_a_deepspeed_block_without_the_engine_and_unknown_strategies():
    spec = prepared({**ds_spec({"zero_stage": 1}), "engine": "torch"})
    assert problems(spec) == ["deepspeed: a deepspeed block needs engine: deepspeed (or remove the block)"]
    spec = prepared(ds_spec({"zero_stage": 1}))
    spec["strategy"] = {"type": "prefix"}  # a strategy the DeepSpeed job does not build
    assert "engine: deepspeed runs strategy full or lora" in problems(spec)[0]


def test_plan_carries_the_config_and_fills_the_planner_fields():
    job = plan(load_spec(ds_spec({"zero_stage": 3}, grad_accumulation=2)), preflight=False)
    assert job.engine_config["zero_optimization"]["stage"] == 3
    assert job.engine_config["train_batch_size"] == 4 * 2 * 2
    assert job.spec["train"]["precision"] == "fp32"
    torch_job = plan(load_spec({**ds_spec(), "engine": "torch", "strategy": {"type": "lora"}}), preflight=False)
    assert torch_job.engine_config is None


def test_planner_reads_the_same_block():
    from launcher.planner import estimate

    spec = prepared(ds_spec({"zero_stage": 3}, workers=4))
    prepare(spec)
    est = estimate(spec)
    assert est["memory_settings"]["zero_stage"] == 3
    assert est["memory_settings"]["precision"] == "fp32"
    zero0 = prepared(ds_spec({"zero_stage": 0}, workers=4))
    prepare(zero0)
    assert est["memory"]["model_states"] < estimate(zero0)["memory"]["model_states"]
