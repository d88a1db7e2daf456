"""Pre-flight dataset checks: every bad input gets one line naming the file, the column and a fix."""

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from launcher import synthetic
from launcher.datacheck import check_dataset, steps_for, sufficiency
from launcher.errors import ConfigError


def _one_line(exc):
    assert len(exc.value.problems) == 1, exc.value.problems
    return exc.value.problems[0]


@pytest.mark.parametrize("task,gen", [("causal_lm", "counting"), ("instruction", "instruction"),
                                      ("classification", "classification"), ("ner", "ner"),
                                      ("vqa", "vqa")])  # fmt: skip
def test_every_generator_passes_the_check_for_its_task(tmp_path, task, gen):
    path = synthetic.make(gen, 30, tmp_path)
    info = check_dataset(path, task)
    assert (info.rows, info.files) == (30, 1)
    assert set(info.columns) <= set(info.schema)


def test_folder_glob_uri_and_arrow_ipc_count_rows_across_files(tmp_path):
    t = synthetic.counting(10, 0)
    (tmp_path / "d").mkdir()
    for i in range(3):
        pq.write_table(t, tmp_path / "d" / f"part-{i}.parquet")
    feather.write_feather(t, tmp_path / "d" / "extra.arrow")
    (tmp_path / "d" / "_SUCCESS").write_text("")
    assert check_dataset(tmp_path / "d", "causal_lm").rows == 40
    assert check_dataset(tmp_path / "d", "causal_lm").files == 4
    assert check_dataset(f"{tmp_path}/d/part-*.parquet", "causal_lm").rows == 30
    assert check_dataset(f"file://{tmp_path}/d", "causal_lm").rows == 40


def test_column_mapping(tmp_path):
    pq.write_table(pa.table({"body": ["a b", "c d"]}), tmp_path / "x.parquet")
    assert check_dataset(tmp_path / "x.parquet", "causal_lm", columns={"text": "body"}).rows == 2
    with pytest.raises(ConfigError) as e:
        check_dataset(tmp_path / "x.parquet", "causal_lm")
    line = _one_line(e)
    assert "x.parquet" in line and "'text'" in line and "body" in line and "columns=" in line
    with pytest.raises(ConfigError, match="not a column of task causal_lm"):
        check_dataset(tmp_path / "x.parquet", "causal_lm", columns={"label": "body"})


def test_missing_file_folder_and_empty_glob(tmp_path):
    for bad, words in [(tmp_path / "nope.parquet", "does not exist"),
                       (f"{tmp_path}/*.parquet", "matches no file")]:  # fmt: skip
        with pytest.raises(ConfigError) as e:
            check_dataset(bad, "causal_lm", role="eval")
        line = _one_line(e)
        assert line.startswith("data.eval: ") and words in line and str(tmp_path) in line
    with pytest.raises(ConfigError, match=r"^data.train: cannot open foo://b/x.parquet .*check the URI"):
        check_dataset("foo://b/x.parquet", "causal_lm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no .parquet"):
        check_dataset(tmp_path / "empty", "causal_lm")


def test_corrupt_and_truncated_files_are_named(tmp_path):
    good = synthetic.make("counting", 20, tmp_path / "d")
    data = good.read_bytes()
    (tmp_path / "d" / "cut.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "d" / "text.parquet").write_text("id,text\n1,hello\n")
    with pytest.raises(ConfigError) as e:
        check_dataset(tmp_path / "d", "causal_lm")
    lines = e.value.problems
    assert len(lines) == 2
    assert "cut.parquet is not a readable Parquet file" in lines[0]
    assert "text.parquet is not a readable Parquet file" in lines[1]
    assert all("\n" not in line and "rewrite the file" in line for line in lines)
    (tmp_path / "bad.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(ConfigError, match="bad.arrow is not a readable Arrow IPC file"):
        check_dataset(tmp_path / "bad.arrow", "causal_lm")


@pytest.mark.parametrize("task,column,value,needs", [
    ("causal_lm", "text", pa.array([1, 2]), "needs a string"),
    ("classification", "label", pa.array(["pos", "neg"]), "needs an integer"),
    ("ner", "tokens", pa.array([[1], [2]]), "needs a list<string>"),
    ("ner", "tags", pa.array([["O"], ["B"]]), "needs a list<int>"),
    ("vqa", "image", pa.array([1.0, 2.0]), "needs binary"),
])  # fmt: skip
def test_wrong_dtype_names_file_column_and_need(tmp_path, task, column, value, needs):
    table = synthetic.GENERATORS["counting" if task == "causal_lm" else task](2, 0)
    table = table.set_column(table.schema.get_field_index(column), column, value)
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(ConfigError) as e:
        check_dataset(tmp_path / "t.parquet", task)
    line = _one_line(e)
    assert f"column '{column}'" in line and "t.parquet" in line and needs in line


def test_image_as_binary_or_flat_list_is_accepted(tmp_path):
    for image in (pa.array([b"\x00" * 12], pa.binary()),
                  pa.array([[0] * 12], pa.list_(pa.uint8(), 12))):  # fmt: skip
        pq.write_table(pa.table({"image": image, "question": ["q"], "answer": ["a"]}), tmp_path / "v.parquet")
        assert check_dataset(tmp_path / "v.parquet", "vqa").rows == 1


def test_empty_dataset(tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(ConfigError, match="0 rows"):
        check_dataset(tmp_path / "e.parquet", "causal_lm")


def test_sufficiency_warns_refuses_and_force():
    assert sufficiency("classification", 100, peft=False) == []
    (w,) = sufficiency("classification", 60, peft=False)
    assert "60 rows" in w and "100" in w
    with pytest.raises(ConfigError, match="add data or set data.force: true"):
        sufficiency("classification", 9, peft=False)
    assert "data.force" in sufficiency("classification", 9, peft=False, force=True)[0]
    # VQA needs 100k for full fine-tuning, 500 with PEFT; below 50 (10% of 500) is refused
    with pytest.raises(ConfigError):
        sufficiency("vqa", 5_000, peft=False)
    assert sufficiency("vqa", 500, peft=True) == []
    assert len(sufficiency("vqa", 50, peft=True)) == 1
    with pytest.raises(ConfigError):
        sufficiency("vqa", 49, peft=True)
    assert sufficiency("causal_lm", 9_999, peft=False) and not sufficiency("ner", 500, peft=False)


def test_steps_for():
    assert steps_for(1000, 1, 8, 2) == 63  # 1000 / 16 = 62.5 -> 63
    assert steps_for(1000, 3, 8, 2) == 189
    assert steps_for(1600, 0.5, 8, 2) == 50
    assert steps_for(3, 1, 8, 2) == 1
    with pytest.raises(ConfigError, match="cannot feed 4 workers"):
        steps_for(3, 1, 8, 4)
    with pytest.raises(ConfigError):
        steps_for(10, 1, 0, 1)


def test_client_data_modules_import_without_pyarrow_torch_or_ray():
    import subprocess
    import sys

    code = (
        "import sys, launcher.datacheck, launcher.synthetic, jobs.data.texture, jobs.data.mix;"
        "print(sorted(m for m in ('pyarrow', 'torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_paths_the_filesystem_refuses_or_that_hold_too_much_are_one_line(tmp_path, monkeypatch):
    import launcher.datacheck as datacheck

    with pytest.raises(ConfigError) as e:
        check_dataset(tmp_path / ("x" * 300), "causal_lm")
    line = _one_line(e)
    assert line.startswith(f"data.train: cannot list {tmp_path}/xxx") and "File name too long" in line
    assert line.endswith("; fix the path or its permissions")
    for i in range(3):
        synthetic.make("counting", 5, tmp_path / "tree" / f"d{i}")
    monkeypatch.setattr(datacheck, "MAX_LISTED", 5)  # 3 folders + 3 files: `/` would hold millions
    with pytest.raises(ConfigError, match=rf"^data.train: {tmp_path}/tree holds over 5 files and folders; "
                                          "point it at the dataset's own folder$"):
        check_dataset(tmp_path / "tree", "causal_lm")
    monkeypatch.setattr(datacheck, "MAX_LISTED", 6)
    assert check_dataset(tmp_path / "tree", "causal_lm").files == 3
