"""The strategy registry is the one place a strategy is known: spec, planner and jobs read it."""

import dataclasses
import typing

import pytest

from launcher import spec as spec_module
from launcher.strategies import STRATEGIES, Strategy, get_strategy, register_strategy


def test_every_strategy_is_one_registration_with_a_spec_model_and_a_family():
    assert set(STRATEGIES) == {"full", "freeze", "gradual_unfreeze", "lora", "qlora", "prefix", "prompt", "ia3"}
    for name, s in STRATEGIES.items():
        assert typing.get_args(s.spec.model_fields["type"].annotation) == (name,)
        assert s.export == ("adapter" if s.family == "adapter" else "model")
    # The spec's `strategy:` field accepts exactly the registered models.
    assert spec_module.STRATEGIES == {n: s.spec for n, s in STRATEGIES.items()}


def test_a_duplicate_or_inconsistent_registration_fails_at_import():
    with pytest.raises(RuntimeError, match="registered twice"):
        register_strategy(STRATEGIES["lora"])
    with pytest.raises(RuntimeError, match="type is"):
        register_strategy(dataclasses.replace(STRATEGIES["lora"], name="lora2"))
    with pytest.raises(RuntimeError, match="peft config"):
        register_strategy(Strategy(name="full", spec=STRATEGIES["full"].spec, family="adapter", summary=""))


def test_freeze_rules_are_names_only_and_shared():
    names = ["model.embed_tokens.weight", "model.layers.0.q.weight", "model.layers.1.q.weight", "lm_head.weight"]
    freeze = get_strategy("freeze")
    assert freeze.trained_names({"type": "freeze", "freeze_first_layers": 1}, names) == {
        "model.layers.1.q.weight", "lm_head.weight"}
    assert freeze.trained_names({"type": "freeze", "train": ["lm_head"]}, names) == {"lm_head.weight"}
    gradual = get_strategy({"type": "gradual_unfreeze"})
    block = {"type": "gradual_unfreeze", "train": ["lm_head"], "schedule": [{"step": 2, "unfreeze": [r"layers\.1"]}]}
    assert gradual.trained_names(block, names) == {"lm_head.weight", "model.layers.1.q.weight"}
    with pytest.raises(KeyError, match="unknown"):
        get_strategy("lorra")
