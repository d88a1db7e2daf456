"""Datasets named by folder, glob, file:// URI and Arrow IPC are read like the pre-flight saw them."""

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from launcher.datacheck import check_dataset

pytestmark = pytest.mark.integration



def test_folder_glob_uri_and_ipc_read_the_checked_rows(ray_local, tmp_path):
    from jobs.data.read import read_dataset

    for i in range(3):
        pq.write_table(pa.table({"text": [f"p{i}-{j}" for j in range(10)]}), tmp_path / f"part-{i}.parquet")
    with ipc.new_file(tmp_path / "extra.arrow", pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": [f"ipc-{j}" for j in range(5)]}))
    for ref in (str(tmp_path), f"{tmp_path}/part-*.parquet", f"file://{tmp_path}", str(tmp_path / "extra.arrow")):
        ds = read_dataset(ref, columns=["text"])
        assert ds.count() == check_dataset(ref, "causal_lm").rows, ref
    assert sorted(read_dataset(str(tmp_path)).to_pandas()["text"])[:1] == ["ipc-0"]


def test_jsonl_gz_and_save_to_disk_stream_the_checked_rows(ray_local, tmp_path):
    from jobs.data.read import read_dataset
    from tests.unit.test_data_formats import ROWS, save_to_disk, write_jsonl

    refs = [write_jsonl(tmp_path / "a.jsonl", ROWS), write_jsonl(tmp_path / "b.jsonl.gz", ROWS, gz=True),
            save_to_disk(tmp_path / "saved", pa.Table.from_pylist(ROWS))]
    for ref in map(str, refs):
        ds = read_dataset(ref, columns=["instruction", "response"])
        assert ds.count() == check_dataset(ref, "instruction").rows == 40, ref
        assert sorted(ds.to_pandas()["response"])[0] == "1 0"


def test_a_large_arrow_shard_is_read_by_a_task_in_blocks_not_whole_in_the_driver(ray_local, tmp_path):
    """A `save_to_disk` shard (the stream format) and an IPC file (the file format) of 25k rows
    each: the stream reads them in its read tasks (no table built in the driver), each task
    decoding BLOCK_ROWS at a time, and every row arrives once, in order."""
    import pyarrow.fs as pafs

    from jobs.data.read import BLOCK_ROWS, _ipc_blocks, read_dataset
    from tests.unit.test_data_formats import save_to_disk

    rows = 25_000
    table = pa.table({"text": [f"r{i}" for i in range(rows)], "n": list(range(rows))})
    table = pa.Table.from_batches(table.to_batches(max_chunksize=1000))  # datasets' writer batch size
    saved = save_to_disk(tmp_path / "saved", table)
    with ipc.new_file(tmp_path / "one.arrow", table.schema) as w:
        w.write_table(table)
    for ref, shard in ((saved, saved / "data-00000-of-00001.arrow"), (tmp_path / "one.arrow",) * 2):
        ds = read_dataset(str(ref), columns=["n"])
        assert {type(op).__name__ for op in operators(ds)} == {"FromItems", "MapBatches"}, ref
        assert ds.to_pandas()["n"].tolist() == list(range(rows)), ref
        sizes = [b.num_rows for b in _ipc_blocks(pafs.LocalFileSystem(), str(shard), ["n"])]
        assert sizes == [BLOCK_ROWS, BLOCK_ROWS, rows - 2 * BLOCK_ROWS], (ref, sizes)


# Operators that start no tasks of their own (the driver or Ray Data's executor runs them:
# RandomizeBlocks only reorders the block references).
TASKLESS = {"FromItems", "Union", "Mix", "RandomizeBlocks"}


def operators(ds) -> list:
    """Every logical operator of a Dataset's plan."""
    found, stack = {}, [ds._logical_plan.dag]
    while stack:
        op = stack.pop()
        if id(op) not in found:
            found[id(op)] = op
            stack.extend(op.input_dependencies)
    return list(found.values())


def cpu_asking(ds) -> list[str]:
    """The operators of a Dataset's plan whose tasks ask a CPU (Ray's default for a map task), or
    that are not known to start none."""
    found = []
    for op in operators(ds):
        args = getattr(op, "ray_remote_args", None)
        if type(op).__name__ in TASKLESS:
            continue
        if args is None:
            found.append(f"{op.name} ({type(op).__name__}: not known to start no task)")
        elif args.get("num_cpus", 1) != 0:
            found.append(f"{op.name} asks {args.get('num_cpus', 1)} CPU")
    return found


def test_every_data_task_of_every_job_kind_asks_no_cpu(ray_local, demo_data, mt_data, vqa_data, tmp_path):
    """What keeps two jobs whose workers take every CPU from waiting on each other for ever
    (test_jobs.py runs that case): no stream of any kind has a task that asks a CPU."""
    from jobs import finetune, joint, multitask, pipeline
    from launcher import synthetic
    from launcher.kinds.multitask import typed_task_settings
    from launcher.spec import load_spec, validate

    causal = validate({
        "kind": "finetune", "name": "x", "model": {"source": "tiny-llama", "seq_len": 40},
        "strategy": {"type": "lora"}, "resources": {"workers": 2, "data_tasks": 3},
        "data": {"train": demo_data["train"], "packing": True,
                 "replay": {"path": demo_data["retain"], "fraction": 0.2}}})
    classes = synthetic.make("classification", 64, tmp_path / "cls")
    labels = validate({
        "kind": "finetune", "name": "y", "model": {"source": "minilm", "seq_len": 32, "num_labels": 4},
        "strategy": {"type": "lora"}, "data": {"task": "classification", "train": str(classes)}})
    plan = {"data": {"train": {"rows": 1200}, "replay": {"rows": 1200}}}
    arrcoc = load_spec("configs/arrcoc/mini.yaml", (f"data.train={vqa_data['train']}",))
    tasks = validate({
        "kind": "multitask", "name": "z", "model": {"source": "tiny-llama", "seq_len": 40},
        "tasks": [{"name": n, "data": {"task": "instruction" if n == "instruction" else "causal_lm", **mt_data[n]}}
                  for n in mt_data]})
    moods = synthetic.make("sentiment", 64, tmp_path / "moods")
    jointly = load_spec("configs/multitask/joint-minilm.yaml", (
        f"tasks.0.data.train={classes}", "tasks.0.data.eval=null", f"tasks.1.data.train={moods}", "tasks.1.data.eval=null"))
    streams = {
        "finetune (packing, replay)": finetune.train_dataset(causal, plan)[0],
        "finetune (classification)": finetune.train_dataset(labels, plan)[0],
        **{f"pipeline stage {i}": pipeline.stage_dataset(arrcoc, i) for i in range(len(arrcoc.stages))},
        **{f"multitask {t.name}": multitask.stream_dataset(typed_task_settings(tasks, t), 40) for t in tasks.tasks},
        **{f"joint {t.name}": joint.task_dataset(t, jointly.model) for t in jointly.tasks},
    }
    assert {name: cpu_asking(ds) for name, ds in streams.items()} == {name: [] for name in streams}
    # what a stream's data_tasks sets: the most tasks of a stage at once
    sized = [op.compute.size for op in operators(streams["finetune (packing, replay)"]) if getattr(op, "compute", None)]
    assert sized and set(sized) == {3}, sized
