"""kind: compare at validate time: variants inherit the base, and every bad variant is named."""

import pytest

from launcher.errors import ConfigError
from launcher.spec import load_spec

BASE = {"kind": "compare", "name": "cmp", "strategy": {"type": "lora", "r": 8},
        "data": {"train": "/x/train.parquet"}, "train": {"max_steps": 10, "lr": 0.01}}


def test_variants_inherit_the_base_and_replace_the_strategy():
    spec = load_spec({**BASE, "variants": {
        "ds_full": {"engine": "deepspeed", "deepspeed": {"zero_stage": 2}, "strategy": {"type": "full"},
                    "train": {"lr": 0.003}},
        "lora32": {"strategy": {"type": "lora", "r": 32}},
        "same": {},
    }})
    v = spec.variant_specs()
    assert v["ds_full"]["strategy"] == {"type": "full"} and v["ds_full"]["engine"] == "deepspeed"
    assert v["ds_full"]["train"]["lr"] == 0.003 and v["ds_full"]["train"]["max_steps"] == 10
    assert v["lora32"]["strategy"]["r"] == 32 and v["lora32"]["train"]["lr"] == 0.01
    assert v["same"]["strategy"]["r"] == 8 and v["same"]["engine"] == "torch"
    assert {s["data"]["train"] for s in v.values()} == {"/x/train.parquet"}
    assert all(s["kind"] == "finetune" and s["name"].startswith("cmp-") for s in v.values())


def test_every_bad_variant_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_spec({**BASE, "variants": {
            "neg": {"strategy": {"type": "lora", "r": -1}},
            "half": {"engine": "deepspeed", "train": {"precision": "fp16"}},
            "typo": {"strategy": {"type": "lorra"}},
        }})
    text = str(err.value)
    assert "variants.neg: strategy.r" in text
    assert "variants.half: train.precision: fp16 needs a GPU (gpus_per_worker > 0)" in text
    assert "variants.typo: strategy.type: 'lorra' is unknown; did you mean 'lora'?" in text


def test_variant_names_are_checked():
    with pytest.raises(ConfigError, match="variant name 'Bad Name'"):
        load_spec({**BASE, "variants": {"Bad Name": {}}})
