"""Spec validation: every error at once, with path, bad value and a did-you-mean."""

from pathlib import Path

import pytest

from launcher.errors import ConfigError
from launcher.spec import apply_override, load_spec

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"kind": "finetune", "name": "ok", "strategy": {"type": "lora"}, "data": {"train": "t.parquet"}}


def problems(data, overrides=()):
    with pytest.raises(ConfigError) as exc:
        load_spec(data, overrides)
    return exc.value.problems


def test_every_error_reported_at_once_with_path_value_and_hint():
    bad = {**GOOD, "trian": {}, "train": {"max_steps": -1, "lrr": 1}, "resources": {"workers": "two"}}
    found = problems(bad)
    assert "trian: unknown key; did you mean 'train'?" in found
    assert "train.lrr: unknown key; did you mean 'train.lr'?" in found
    assert any(p.startswith("train.max_steps:") and "(got -1)" in p for p in found)
    assert any(p.startswith("resources.workers:") and "'two'" in p for p in found)
    assert len(found) == 4


def test_unknown_kind_and_strategy_get_suggestions():
    assert problems({**GOOD, "kind": "fintune"}) == ["kind: 'fintune' is not a job kind; did you mean 'finetune'?"]
    assert problems({**GOOD, "strategy": {"type": "lorra"}}) == [
        "strategy.type: 'lorra' is unknown; did you mean 'lora'?"
    ]


def test_missing_required_and_bad_name():
    found = problems({"kind": "finetune", "name": "Bad Name", "strategy": {"type": "full"}})
    assert "data: required field is missing" in found
    assert any(p.startswith("name:") and "'Bad Name'" in p for p in found)


def test_unknown_model_source_hint():
    found = problems({**GOOD, "model": {"source": "tiny-lama"}})
    assert found == ["model.source: unknown model source; did you mean 'tiny-llama'? (got 'tiny-lama')"]


def test_overrides_are_parsed_as_yaml_and_validated():
    spec = load_spec(GOOD, ("train.max_steps=7", "strategy.r=4", "strategy.target_modules=[q_proj, v_proj]"))
    assert spec.train.max_steps == 7 and spec.strategy.r == 4
    assert spec.strategy.target_modules == ["q_proj", "v_proj"]
    assert problems(GOOD, ("train.max_stepz=7",)) == ["train.max_stepz: unknown key; did you mean 'train.max_steps'?"]


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="is not key=value"):
        apply_override({}, "train.max_steps")
    with pytest.raises(ConfigError, match="'name' is not a mapping"):
        apply_override({"name": "x"}, "name.first=1")


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: finetune\nname: [unclosed\n")
    with pytest.raises(ConfigError, match=r"YAML error at line \d+"):
        load_spec(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="a spec is a YAML mapping"):
        load_spec(listy)


SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_spec_validates_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ftlaunch "), f"{path.name} must start with the command that runs it"
    load_spec(path)
