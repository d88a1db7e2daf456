"""Chat and instruction datasets are checked at plan in every format (Parquet, Arrow IPC, JSONL, a
`datasets.save_to_disk` folder): OpenAI `messages` and ShareGPT `conversations` are recognised
without configuration, `data.columns.messages` renames; a wrong column is one line naming the
column, its type and what the task needs."""

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import yaml

from launcher.cli.main import main
from launcher.datacheck import check_dataset
from launcher.errors import ConfigError
from tests.unit.test_data_formats import save_to_disk, write_jsonl

OPENAI = [{"messages": [{"role": "user", "content": f"what is {i}?"}, {"role": "assistant", "content": f"{i}."}]}
          for i in range(60)]
SHAREGPT = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(60)]
NEEDS = ("a list<struct<role: string, content: string>> (OpenAI) or list<struct<from: string, value: string>> "
         "(ShareGPT)")


def write(tmp_path, fmt, rows):
    """`rows` in one format; returns the path a spec's data.train names."""
    table = pa.Table.from_pylist(rows)
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "train.jsonl", rows)
    if fmt == "parquet":
        pq.write_table(table, tmp_path / "train.parquet")
        return tmp_path / "train.parquet"
    if fmt == "arrow":
        with ipc.new_file(tmp_path / "train.arrow", table.schema) as w:
            w.write_table(table)
        return tmp_path / "train.arrow"
    return save_to_disk(tmp_path / "saved", table)


FORMATS = ("parquet", "arrow", "jsonl", "save_to_disk")
BAD = {  # rows, the column, and how it reads in the message
    "turns as strings": ([{"messages": ["hi", "hello"]}] * 60, "messages", "list<item: string>"),
    "a string, not turns": ([{"messages": "user: hi"}] * 60, "messages", "string"),
    "content parts, not text": ([{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}] * 60,
                                "messages", "list<item: struct<role: string, content: list<item: struct<type: "
                                "string, text: string>>>>"),
    "a ShareGPT turn without value": ([{"conversations": [{"from": "human", "text": "hi"}]}] * 60, "conversations",
                                      "list<item: struct<from: string, text: string>>"),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_openai_and_sharegpt_chats_are_recognised_in_every_format(tmp_path, fmt):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    info = check_dataset(write(tmp_path / "a", fmt, OPENAI), "chat")
    assert (info.rows, info.columns) == (60, {"messages": "messages"})
    info = check_dataset(write(tmp_path / "b", fmt, SHAREGPT), "chat")
    assert (info.rows, info.columns) == (60, {"messages": "conversations"})


def test_data_columns_messages_renames_and_a_missing_column_names_both_shapes(tmp_path):
    rows = [{"dialog": r["messages"]} for r in OPENAI]
    path = write(tmp_path, "jsonl", rows)
    assert check_dataset(path, "chat", columns={"messages": "dialog"}).columns == {"messages": "dialog"}
    with pytest.raises(ConfigError) as exc:
        check_dataset(path, "chat")
    assert exc.value.problems == [
        f"data.train: {path} has no column 'messages' (or ShareGPT's 'conversations') that task chat needs as "
        "messages (it has: dialog); rename a column or map it: columns={'messages': '<column>'}"]
    with pytest.raises(ConfigError, match="data.columns: text is not a column of task chat; use messages"):
        check_dataset(path, "chat", columns={"text": "dialog"})


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_wrong_chat_column_is_one_line_at_plan(tmp_path, fmt, case, capsys):
    rows, column, shown = BAD[case]
    path = write(tmp_path, fmt, rows)
    spec = {"kind": "finetune", "name": "chat", "model": {"source": "tiny-llama", "seq_len": 48},
            "strategy": {"type": "lora", "r": 4}, "data": {"task": "chat", "train": str(path), "chat_template":
                                                          "chatml"},
            "train": {"max_steps": 5}, "resources": {"workers": 1}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["plan", str(tmp_path / "spec.yaml")]) == 1
    err = capsys.readouterr().err
    files = {"save_to_disk": path / "data-00000-of-00001.arrow"}.get(fmt, path)
    shown = shown.replace("<item:", "<element:") if fmt == "parquet" else shown  # Parquet names list items so
    assert err == (f"ftlaunch: error: data.train: column '{column}' in {files} is {shown}, task chat needs {NEEDS}; "
                   "convert the column or map another one\n")


def test_chat_content_may_be_null_and_turns_may_carry_more_keys(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi", "name": "ann"},
                          {"role": "assistant", "content": None}]}] * 60
    assert check_dataset(write(tmp_path, "parquet", rows), "chat").rows == 60


@pytest.mark.parametrize("fmt", FORMATS)
def test_instruction_optional_input_and_system_are_checked_when_present(tmp_path, fmt):
    good = [{"instruction": "add", "input": "1 2", "system": None, "response": "3"}] * 60
    (tmp_path / "good").mkdir()
    assert check_dataset(write(tmp_path / "good", fmt, good), "instruction").rows == 60
    bad = [{"instruction": "add", "input": 12, "response": "3"}] * 60
    path = write(tmp_path, fmt, bad)
    files = {"save_to_disk": path / "data-00000-of-00001.arrow"}.get(fmt, path)
    with pytest.raises(ConfigError) as exc:
        check_dataset(path, "instruction")
    assert exc.value.problems == [f"data.train: column 'input' in {files} is int64, task instruction needs a "
                                  "string; convert the column or map another one"]


def test_instruction_columns_rename_and_a_mapped_optional_column_must_exist(tmp_path):
    rows = [{"q": "add", "a": "3", "ctx": "1 2"}] * 60
    path = write(tmp_path, "jsonl", rows)
    mapping = {"instruction": "q", "response": "a", "input": "ctx"}
    assert check_dataset(path, "instruction", columns=mapping).columns["input"] == "ctx"
    with pytest.raises(ConfigError) as exc:
        check_dataset(path, "instruction", columns={**mapping, "system": "sys"})
    assert exc.value.problems == [f"data.train: {path} has no column 'sys' that task instruction reads as system "
                                  "(it has: q, a, ctx); rename a column or fix the mapping"]


def test_a_chat_on_the_byte_tokenizer_needs_a_named_template(tmp_path, capsys):
    path = write(tmp_path, "jsonl", OPENAI * 10)
    spec = {"kind": "finetune", "name": "chat", "model": {"source": "tiny-llama", "seq_len": 48},
            "strategy": {"type": "lora", "r": 4}, "data": {"task": "chat", "train": str(path)},
            "train": {"max_steps": 5}, "resources": {"workers": 1}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["plan", str(tmp_path / "spec.yaml")]) == 1
    assert capsys.readouterr().err == (
        "ftlaunch: error: data.task: chat on tiny-llama needs a chat template and its byte-level tokenizer has "
        "none; set data.chat_template: chatml | llama3 | mistral\n")
    assert main(["plan", str(tmp_path / "spec.yaml"), "data.chat_template=chatml"]) == 0


# Instruction sets in the layouts other tools read: Alpaca, Dolly, TRL's prompt-completion.
CANONICAL = [{"instruction": f"add {i} and 2", "input": f"{i} 2", "response": f"{i + 2}"} for i in range(60)]
LAYOUTS = {  # layout: (its rows, role -> the column plan reads it from)
    "alpaca": ([{"instruction": r["instruction"], "input": r["input"], "output": r["response"]} for r in CANONICAL],
               {"instruction": "instruction", "input": "input", "response": "output"}),
    "dolly": ([{"instruction": r["instruction"], "context": r["input"], "response": r["response"],
                "category": "math"} for r in CANONICAL],
              {"instruction": "instruction", "input": "context", "response": "response"}),
    "trl": ([{"prompt": f"{r['instruction']}\n\n{r['input']}", "completion": r["response"]} for r in CANONICAL],
            {"instruction": "prompt", "response": "completion"}),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_alpaca_dolly_and_trl_instruction_layouts_are_recognised_without_data_columns(tmp_path, fmt, layout):
    rows, columns = LAYOUTS[layout]
    assert check_dataset(write(tmp_path, fmt, rows), "instruction").columns == columns


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_instruction_layout_trains_on_the_same_tokens_as_the_canonical_columns(layout):
    import numpy as np

    from jobs import text as T
    from launcher.spec import DataSpec, ModelSpec

    model, data = ModelSpec(source="tiny-llama", seq_len=96), DataSpec(train="x.jsonl", task="instruction")

    def encoded(rows):
        batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
        return T.encode(batch, model, data, 96)

    canonical = CANONICAL if layout != "trl" else [  # TRL's prompt holds the input already
        {"instruction": f"{r['instruction']}\n\n{r['input']}", "response": r["response"]} for r in CANONICAL]
    ours, theirs = encoded(canonical), encoded(LAYOUTS[layout][0])
    for key in ("input_ids", "labels"):
        np.testing.assert_array_equal(theirs[key], ours[key])
    assert (ours["labels"] != T.IGNORE).any()  # the loss falls on the responses


def test_a_spec_mapping_wins_over_a_layout_and_a_missing_role_names_the_layouts_columns(tmp_path):
    from common.chat import instruction_columns
    from jobs.data.badrows import row_problem
    from launcher.spec import DataSpec

    # data.columns takes 'prompt' for the input: the instruction is not read from it as well
    assert instruction_columns({"input": "prompt"}, ["question", "prompt", "completion"]) == {
        "input": "prompt", "instruction": "instruction", "response": "completion", "system": "system"}
    path = write(tmp_path, "jsonl", [{"question": "q", "answer": "a"}] * 60)
    with pytest.raises(ConfigError) as exc:
        check_dataset(path, "instruction")
    assert exc.value.problems[1] == (
        f"data.train: {path} has no column 'response' (nor 'output' or 'completion') that task instruction needs "
        "as response (it has: question, answer); rename a column or map it: columns={'response': '<column>'}")
    # the job's bad-row check reads the same columns: a TRL row with no completion names it
    trl = DataSpec(train="x.jsonl", task="instruction")
    assert row_problem({"prompt": "q", "completion": None}, trl) == "completion is null"
    assert row_problem({"prompt": "q", "completion": "a"}, trl) is None
