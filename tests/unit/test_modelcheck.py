"""A model folder's tokenizer is checked at plan, one line per refusal: no tokenizer files, a
vocabulary larger than the embeddings, seq_len past the positions, a chat task without a chat
template (unless data.chat_template names a shipped one); no pad token is a warning (eos pads)."""

import json

import pytest
import yaml

from launcher.cli.main import main
from launcher.errors import ConfigError
from launcher.modelcheck import check_folder, tokenizer_facts


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    from launcher.synthetic import make

    return make("chat", 600, tmp_path_factory.mktemp("chat"), fmt="jsonl")


@pytest.fixture
def folder(made_model, tmp_path):
    return made_model("qwen2", tmp_path / "q")


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def plan(tmp_path, folder, chat_data, capsys, *overrides):
    spec = {"kind": "finetune", "name": "own", "model": {"source": f"hf:{folder}", "seq_len": 160},
            "strategy": {"type": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
            "data": {"task": "chat", "train": str(chat_data)},
            "train": {"max_steps": 5, "micro_batch": 4}, "resources": {"workers": 1, "cpus_per_worker": 1}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    rc = main(["plan", str(path), *overrides])
    out, err = capsys.readouterr()
    return rc, out, err


def refusal(tmp_path, folder, chat_data, capsys, *overrides):
    rc, out, err = plan(tmp_path, folder, chat_data, capsys, *overrides)
    assert rc == 1 and out == "", out
    assert err.count("\n") == 1, err  # one line
    return err.removeprefix("ftlaunch: error: ").strip()


def test_the_made_folder_plans_with_no_model_warning(folder, tmp_path, chat_data, capsys):
    rc, out, err = plan(tmp_path, folder, chat_data, capsys)
    assert rc == 0, err
    assert "model.source" not in out and "chat_template" not in out
    facts = tokenizer_facts(str(folder))
    assert facts.size == len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    assert (facts.eos, facts.pad) == ("<|im_end|>", "<|endoftext|>")
    assert "<|im_start|>" in facts.tokens and facts.chat_template.startswith("{% for message")


def test_a_folder_without_tokenizer_files(folder, tmp_path, chat_data, capsys):
    (folder / "tokenizer.json").unlink()
    assert refusal(tmp_path, folder, chat_data, capsys) == (
        f"model.source: {folder} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, vocab.txt); "
        "save the model's tokenizer into it (tokenizer.save_pretrained(folder)) or use the folder it came in")


def test_a_vocabulary_larger_than_the_embeddings(folder, tmp_path, chat_data, capsys):
    size = tokenizer_facts(str(folder)).size
    edit_json(folder / "config.json", vocab_size=size - 1)
    assert refusal(tmp_path, folder, chat_data, capsys) == (
        f"model.source: the tokenizer of {folder} has {size:,} tokens (added ones included) but the model has "
        f"{size - 1:,} embedding rows (config.json vocab_size); ids past {size - 2} would index out of range: resize "
        "the embeddings (model.resize_token_embeddings(len(tokenizer))) and save again, or use the model's own "
        "tokenizer")
    # added tokens count: one past the vocabulary's last id is one more id
    edit_json(folder / "config.json", vocab_size=size)
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["added_tokens"].append({"id": size, "content": "<|tool|>", "special": True, "single_word": False,
                               "lstrip": False, "rstrip": False, "normalized": False})
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    assert f"has {size + 1:,} tokens" in refusal(tmp_path, folder, chat_data, capsys)


def test_seq_len_past_the_models_positions(folder, tmp_path, chat_data, capsys):
    assert refusal(tmp_path, folder, chat_data, capsys, "model.seq_len=1024") == (
        f"model.seq_len: 1024 is above the 512 positions of hf:{folder} (config.json max_position_embeddings); "
        "set model.seq_len to at most 512")
    # model.config overrides what the folder says
    rc, _, err = plan(tmp_path, folder, chat_data, capsys, "model.seq_len=1024",
                      "model.config.max_position_embeddings=2048")
    assert rc == 0, err


def test_a_chat_task_needs_a_chat_template_or_a_shipped_one_named(folder, tmp_path, chat_data, capsys):
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    assert refusal(tmp_path, folder, chat_data, capsys) == (
        f"data.task: chat needs a chat template and the tokenizer of {folder} has none (tokenizer_config.json "
        "chat_template, chat_template.jinja); set data.chat_template: chatml | llama3 | mistral, or use a folder "
        "that ships one")
    rc, out, err = plan(tmp_path, folder, chat_data, capsys, "data.chat_template=chatml")
    assert rc == 0 and "chat_template" not in out, err  # qwen2's tokenizer holds chatml's tokens
    rc, out, err = plan(tmp_path, folder, chat_data, capsys, "data.chat_template=llama3")
    assert rc == 0, err
    assert (f"data.chat_template: llama3 writes <|start_header_id|>, <|end_header_id|>, <|eot_id|>, which the "
            f"tokenizer of {folder} does not hold as tokens: each is split into pieces") in out
    # transformers < 4.43 wrote the template into tokenizer_config.json: found there too
    edit_json(folder / "tokenizer_config.json", chat_template=template)
    rc, out, err = plan(tmp_path, folder, chat_data, capsys, "data.chat_template=chatml")
    assert rc == 0, err
    assert f"data.chat_template: chatml is not used: the tokenizer of {folder} has its own chat template" in out
    # an instruction task renders with the plain template: no template is needed
    edit_json(folder / "tokenizer_config.json", chat_template=None)
    with pytest.raises(ConfigError):
        check_folder(str(folder), {"seq_len": 64}, [{"task": "chat"}])
    assert check_folder(str(folder), {"seq_len": 64}, [{"task": "instruction"}]) == []


def test_no_pad_token_pads_with_eos_and_says_so(folder, tmp_path, chat_data, capsys):
    edit_json(folder / "tokenizer_config.json", pad_token=None)
    rc, out, err = plan(tmp_path, folder, chat_data, capsys)
    assert rc == 0, err
    assert f"warning       model.source: the tokenizer of {folder} has no pad token; the job uses eos " \
           "(<|im_end|>) as pad" in out
    edit_json(folder / "tokenizer_config.json", eos_token=None)
    assert refusal(tmp_path, folder, chat_data, capsys) == (
        f"model.source: the tokenizer of {folder} has neither a pad nor an eos token; add one "
        "(tokenizer.add_special_tokens({'pad_token': ...})) and save the folder again")


def test_the_check_reads_json_only():
    import ast
    from pathlib import Path

    import launcher.modelcheck as mc

    tree = ast.parse(Path(mc.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "dataclasses", "json", "os", "re", "typing", "common", "launcher"}
