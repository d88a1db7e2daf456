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
    # A misspelled key is named (it was "kind: missing is not a job kind").
    misspelled = {("knd" if k == "kind" else k): v for k, v in GOOD.items()}
    assert problems(misspelled) == ["kind: missing; unknown key 'knd': did you mean 'kind'?"]
    assert problems({**GOOD, "strategy": {"type": "lorra"}}) == [
        "strategy.type: 'lorra' is unknown; did you mean 'lora'?"
    ]


def test_missing_required_and_bad_name():
    found = problems({"kind": "finetune", "name": "Bad Name", "strategy": {"type": "full"}})
    assert "data: required field is missing" in found
    assert any(p.startswith("name:") and "'Bad Name'" in p for p in found)


def test_unknown_model_source_hint():
    known = "tiny-llama, minilm, arrcoc-mini, arrcoc-7b, llama-2-7b, or hf:<local model folder>"
    found = problems({**GOOD, "model": {"source": "tiny-lama"}})
    assert found == [f"model.source: unknown model source; did you mean 'tiny-llama'? Known: {known} "
                     "(got 'tiny-lama')"]
    assert problems({**GOOD, "model": {"source": "gpt-99"}}) == [
        f"model.source: unknown model source; use one of {known} (got 'gpt-99')"]


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


def test_values_no_filesystem_or_arithmetic_accepts_are_refused():
    found = problems({**GOOD, "data": {"train": "a\x00b", "eval": " "}, "storage": "runs\n",
                      "resources": {"cpus_per_worker": float("inf")}, "env": {"1X": "v", "OK": "a\x00"}})
    assert "data.train: a path cannot hold control characters (a newline, a NUL byte); fix the path (got 'a\\x00b')" in found
    assert "data.eval: the path is empty; give a file, folder, glob or URI (got ' ')" in found
    assert any(p.startswith("storage: a path cannot hold control characters") for p in found)
    assert "resources.cpus_per_worker: Input should be a finite number (got inf)" in found
    assert any(p.startswith("env.1X: invalid key: String should match pattern") for p in found)
    assert any(p.startswith("env.OK: String should match pattern") for p in found)
    assert len(found) == 6
    assert problems({**GOOD, "kind": ["finetune"]}) == [
        "kind: ['finetune'] is not a job kind; did you mean 'finetune'?"]
    assert problems({**GOOD, "train": {"micro_batch": 10**400}, "resources": {"cpus_per_worker": 1e308}}) == [
        f"train.micro_batch: Input should be less than or equal to 1048576 (got {10**400!r:.57}...)",
        "resources.cpus_per_worker: Input should be less than or equal to 1024 (got 1e+308)"]
    assert problems({**GOOD, "model": {"num_labels": 10**12}}) == [
        "model.num_labels: Input should be less than or equal to 100000 (got 1000000000000)"]


def test_files_that_are_no_spec_text_name_the_problem(tmp_path):
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"kind: finetune\n\x80\x81")
    with pytest.raises(ConfigError, match=r"byte 0x80 at offset 15 is not UTF-8 text; save the spec as UTF-8"):
        load_spec(binary)
    looped = tmp_path / "loop.yaml"
    looped.write_text("kind: finetune\nmodel: {config: &c {x: [*c]}}\n")
    with pytest.raises(ConfigError) as exc:
        load_spec(looped)
    assert exc.value.problems == ["model.config.x.0: a YAML alias makes this value contain itself; remove the alias"]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [" + ", ".join(["x"] * 50) + "]\n"
                    + "".join(f"{n}: &{n} [" + ", ".join([f"*{p}"] * 50) + "]\n" for p, n in zip("abc", "bcd")))
    with pytest.raises(ConfigError, match=r"expands to over 100,000 values \(YAML aliases\?\)"):
        load_spec(bomb)
