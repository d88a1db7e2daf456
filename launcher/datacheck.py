"""Pre-flight dataset checks on the client: schema, row counts and size, from file footers only.

Nothing here reads row data, so a check of an s3:// folder costs a few range requests per file.
pyarrow is imported inside functions: the client may run without it until data is checked.
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass, field

from common.chat import INSTRUCTION_ALIASES, instruction_columns, messages_column
from launcher.errors import ConfigError

TASK_COLUMNS = {
    "causal_lm": ("text",),
    "instruction": ("instruction", "response"),
    "chat": ("messages",),  # or ShareGPT's `conversations`, recognised without data.columns
    "classification": ("text", "label"),
    "ner": ("tokens", "tags"),
    "vqa": ("image", "question", "answer"),
}
# Columns a task reads when the rows have them (data.columns may rename them too).
OPTIONAL_COLUMNS = {"instruction": ("input", "system")}
# what each role column must hold, as the error message names it
_NEEDS = {
    "input": "a string", "system": "a string",
    "messages": "a list<struct<role: string, content: string>> (OpenAI) or "
                "list<struct<from: string, value: string>> (ShareGPT)",
    "text": "a string", "instruction": "a string", "response": "a string",
    "question": "a string", "answer": "a string", "label": "an integer",
    "tokens": "a list<string>", "tags": "a list<int>",
    "image": "binary, a fixed-size list<uint8> or a fixed-shape tensor",
}  # fmt: skip
PARQUET = (".parquet", ".parq", ".pq")
ARROW_IPC = (".arrow", ".feather", ".ipc")  # the file format, or the stream one (datasets' save_to_disk)
JSONL = (".jsonl", ".json", ".jsonl.gz", ".json.gz")  # one JSON object per line
DATA_SUFFIXES = PARQUET + ARROW_IPC + JSONL
DATASETS_STATE = "state.json"  # a `datasets.save_to_disk` folder: its data files are listed there
JSONL_SCHEMA_ROWS = 256  # rows whose types stand for the file's schema
_MAX_LINES = 8
MAX_LISTED = 100_000  # files and folders a dataset path may hold

# Rough minimum examples per task (DESIGN.md "Bad input"); PEFT gets by with 50-500.
MINIMUM_ROWS = {
    "classification": 100,
    "ner": 500,
    "instruction": 1_000,
    "chat": 1_000,
    "causal_lm": 10_000,
    "vqa": 100_000,
}
PEFT_MINIMUM_ROWS = 500


@dataclass(frozen=True)
class DatasetInfo:
    path: str
    rows: int
    files: int
    schema: dict[str, str]  # column name -> Arrow type, of the first file
    columns: dict[str, str] = field(default_factory=dict)  # task role -> column in the files


def _type_ok(role: str, t) -> bool:
    import pyarrow as pa

    def is_str(x):
        return pa.types.is_string(x) or pa.types.is_large_string(x) or pa.types.is_string_view(x)

    def is_list(x):
        return pa.types.is_list(x) or pa.types.is_large_list(x) or pa.types.is_fixed_size_list(x)

    if isinstance(t, pa.BaseExtensionType):
        if role == "image":  # arrow.fixed_shape_tensor, or Ray's tensor extensions
            return "tensor" in t.extension_name
        t = t.storage_type
    if role == "label":
        return pa.types.is_integer(t)
    if role in ("input", "system"):  # optional: a column of JSON nulls only is no text, and harmless
        return is_str(t) or pa.types.is_null(t)
    if role == "messages":
        if not is_list(t) or not pa.types.is_struct(t.value_type):
            return False
        turn = {f.name: f.type for f in t.value_type}
        keys = ("role", "content") if "role" in turn else ("from", "value")
        return all(k in turn and (is_str(turn[k]) or pa.types.is_null(turn[k])) for k in keys)
    if role == "tokens":
        return is_list(t) and is_str(t.value_type)
    if role == "tags":
        return is_list(t) and pa.types.is_integer(t.value_type)
    if role == "image":
        binary = pa.types.is_binary(t) or pa.types.is_large_binary(t)
        return binary or (is_list(t) and pa.types.is_integer(t.value_type))
    return is_str(t)


def _filesystem(path_or_uri: str, where: str):
    import pyarrow.fs as pafs

    if "://" in path_or_uri:
        try:
            return pafs.FileSystem.from_uri(path_or_uri)
        except Exception as e:  # unknown scheme, missing credentials, bad bucket name
            raise ConfigError(f"{where}: cannot open {path_or_uri} ({e}); check the URI and credentials")
    from pathlib import Path

    return pafs.LocalFileSystem(), str(Path(path_or_uri).expanduser().absolute())


def _data_files(fs, path: str, shown: str, where: str) -> list[str]:
    import pyarrow as pa

    try:
        return _find_files(fs, path, shown, where)
    except pa.ArrowInvalid as e:  # a path this filesystem cannot name
        raise ConfigError(f"{where}: {shown} is not a path here ({str(e).splitlines()[0][:160]}); fix it") from None
    except OSError as e:  # permissions, a name too long, an unreachable bucket
        reason = os.strerror(e.errno) if e.errno else (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{where}: cannot list {shown} ({reason}); fix the path or its permissions") from None


def _find_files(fs, path: str, shown: str, where: str) -> list[str]:
    import pyarrow.fs as pafs

    def listing(base):
        # Folder by folder, skipping `_`/`.` entries as readers do, and bounded: a path such as
        # `/` must not make plan walk the whole machine (or loop through /proc).
        files, folders, seen = [], [base], 0
        while folders:
            infos = fs.get_file_info(pafs.FileSelector(folders.pop(), allow_not_found=True))
            seen += len(infos)
            if seen > MAX_LISTED:
                raise ConfigError(f"{where}: {shown} holds over {MAX_LISTED:,} files and folders; "
                                  "point it at the dataset's own folder")
            for i in infos:
                if i.base_name.startswith(("_", ".")):
                    continue
                if i.type == pafs.FileType.File:
                    files.append(i.path)
                elif i.type == pafs.FileType.Directory:
                    folders.append(i.path)
        return sorted(files)

    if any(c in path for c in "*?["):
        base = path[: min(path.find(c) for c in "*?[" if c in path)].rpartition("/")[0] or "/"
        files = [f for f in listing(base) if fnmatch.fnmatch(f, path)]
        if not files:
            raise ConfigError(f"{where}: the pattern {shown} matches no file; fix the pattern")
        return files
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(
            f"{where}: {shown} does not exist; fix the path (or write it: ftlaunch data make ...)"
        )
    if info.type == pafs.FileType.File:
        return [path]
    saved = _saved_dataset_files(fs, path, shown, where)
    if saved is not None:
        return saved
    files = [f for f in listing(path) if f.lower().endswith(DATA_SUFFIXES)]
    if not files:
        raise ConfigError(
            f"{where}: the folder {shown} holds no {'/'.join(DATA_SUFFIXES)} file; "
            "point it at the data files"
        )
    return files


def _saved_dataset_files(fs, path: str, shown: str, where: str):
    """The Arrow files of a `datasets.save_to_disk` folder (named in its state.json), else None."""
    import json

    import pyarrow.fs as pafs

    state = f"{path.rstrip('/')}/{DATASETS_STATE}"
    if fs.get_file_info(state).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(state) as f:
            names = [d["filename"] for d in json.loads(f.read())["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{where}: {shown}/{DATASETS_STATE} is not a datasets state file ({e}); "
                          "save the dataset again with save_to_disk") from None
    if not names:
        raise ConfigError(f"{where}: {shown}/{DATASETS_STATE} lists no data file; add data")
    return [f"{path.rstrip('/')}/{name}" for name in names]


def is_jsonl(path: str) -> bool:
    return path.lower().endswith(JSONL)


def shown_uri(path_or_uri: str) -> str:
    """A path or URI as error lines name it: a URI without its ?options (endpoints, regions)."""
    return path_or_uri.split("?", 1)[0] if "://" in path_or_uri else path_or_uri


def list_files(path_or_uri: str, role: str = "train") -> tuple[object, list[str]]:
    """The filesystem and the data files a path, folder, glob or URI names (what jobs read)."""
    where, shown = f"data.{role}", shown_uri(str(path_or_uri))
    fs, path = _filesystem(str(path_or_uri), where)
    if "://" in str(path_or_uri) and not path.strip("/"):
        raise ConfigError(f"{where}: {shown} names no bucket or folder; use e.g. s3://bucket/path/train.parquet")
    _check_bucket(fs, path, shown, where)
    return fs, _data_files(fs, path, shown, where)


def _check_bucket(fs, path: str, shown: str, where: str) -> None:
    """An object store's missing bucket, named as such (not as a missing file)."""
    import pyarrow.fs as pafs

    if getattr(fs, "type_name", "") not in ("s3", "gcs"):
        return
    bucket = path.split("/", 1)[0]
    try:
        missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except OSError:
        return  # unreachable, or no right to look: the listing's own line says which
    if missing:
        raise ConfigError(f"{where}: the bucket {bucket} of {shown} does not exist; create it or fix the URI")


def _footer(fs, path: str, skip_bad_rows: int = 0):
    """(rows, arrow schema) of a data file, without reading its rows where the format allows
    (Parquet footer, Arrow IPC file footer); raises ValueError with the reason."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    if is_jsonl(path):
        return _jsonl_rows(fs, path, skip_bad_rows)
    with fs.open_input_file(path) as f:
        try:
            if path.lower().endswith(ARROW_IPC):
                try:
                    reader = ipc.open_file(f)
                    return reader.count_rows(), reader.schema
                except pa.ArrowInvalid:  # the stream format (datasets' save_to_disk): no footer
                    f.seek(0)
                    stream = ipc.open_stream(f)
                    return sum(batch.num_rows for batch in stream), stream.schema
            meta = pq.ParquetFile(f).metadata
            return meta.num_rows, meta.schema.to_arrow_schema()
        except (pa.ArrowException, OSError) as e:
            kind = "Arrow IPC" if path.lower().endswith(ARROW_IPC) else "Parquet"
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"is not a readable {kind} file ({reason})") from e


def _jsonl_rows(fs, path: str, skip_bad_rows: int = 0):
    """Rows and schema of a JSON-lines file: every line must be a JSON object (a line that is not
    names its number); the schema is inferred from the first rows, as a JSON reader would. Rows
    among them whose values change their column's type are bad rows: up to `skip_bad_rows` of
    them are left out of the schema (the job skips them, data.skip_bad_rows), more are refused."""
    import io
    import json

    import pyarrow as pa

    rows, sample, numbers = 0, [], []
    with fs.open_input_stream(path) as stream:  # pyarrow decompresses .gz by the file's ending
        try:
            for number, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"line {number} is not JSON ({e.args[0][:80]})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"line {number} is a JSON {type(record).__name__}, not an object with columns")
                rows += 1
                if len(sample) < JSONL_SCHEMA_ROWS:
                    sample.append(record)
                    numbers.append(number)
        except (UnicodeDecodeError, OSError, EOFError, pa.ArrowException) as e:
            raise ValueError(f"is not readable UTF-8 JSON lines ({str(e).splitlines()[0][:80]})") from None
    try:
        schema = pa.Table.from_pylist(sample).schema if sample else pa.schema([])
    except (pa.ArrowException, TypeError) as e:
        bad = {i for i, *_ in odd_types(sample)}
        if bad and len(bad) <= skip_bad_rows:
            kept = [r for i, r in enumerate(sample) if i not in bad]
            return rows, pa.Table.from_pylist(kept).schema if kept else pa.schema([])
        odd = _odd_type(sample)
        where = f"line {numbers[odd[0]]}: {odd[1]}" if odd else str(e).splitlines()[0][:80]
        raise ValueError(f"has rows whose columns change type ({where})") from None
    return rows, schema


def _odd_type(rows: list[dict]):
    """(index, what) of the first row with a value whose JSON type is not its column's usual one."""
    odd = odd_types(rows)
    if not odd:
        return None
    i, column, kind, usual = odd[0]
    return i, f"{column} is a {kind} where the other rows have a {usual}"


def odd_types(rows: list[dict]) -> list[tuple[int, str, str, str]]:
    """(row index, column, its kind, the column's usual kind) for each value of `rows` (JSON
    objects) whose JSON type is not the one most of its column's values have."""
    def kind(v):
        return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else {
            str: "string", bool: "boolean", list: "list", dict: "object"}.get(type(v), type(v).__name__)

    counts: dict = {}
    for row in rows:
        for k, v in row.items():
            if v is not None:
                counts.setdefault(k, {}).setdefault(kind(v), 0)
                counts[k][kind(v)] += 1
    usual = {k: max(c, key=c.get) for k, c in counts.items()}
    return [(i, k, kind(v), usual[k]) for i, row in enumerate(rows) for k, v in row.items()
            if v is not None and kind(v) != usual[k]]


def sample_rows(path_or_uri: str, n: int = 256, role: str = "train") -> list[dict]:
    """The first `n` rows of a dataset (its first files), for estimates that need real text (the
    plan's packing figure): one record batch of Parquet or Arrow IPC, the first lines of JSONL."""
    import io
    import json

    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    fs, files = list_files(path_or_uri, role)
    rows: list[dict] = []
    for path in files:
        if len(rows) >= n:
            break
        want = n - len(rows)
        if is_jsonl(path):
            with fs.open_input_stream(path) as stream:
                for line in io.TextIOWrapper(stream, encoding="utf-8"):
                    if line.strip():
                        rows.append(json.loads(line))
                        if len(rows) >= n:
                            break
            continue
        with fs.open_input_file(path) as f:
            if path.lower().endswith(ARROW_IPC):
                try:
                    reader = ipc.open_file(f)
                    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
                except pa.ArrowInvalid:  # the stream format (save_to_disk)
                    f.seek(0)
                    batches = iter(ipc.open_stream(f))
            else:
                batches = pq.ParquetFile(f).iter_batches(batch_size=want)
            for batch in batches:
                rows += batch.slice(0, n - len(rows)).to_pylist()
                if len(rows) >= n:
                    break
    return rows


def check_dataset(
    path_or_uri: str, task: str, *, role: str = "train", columns: dict[str, str] | None = None,
    skip_bad_rows: int = 0,
) -> DatasetInfo:
    """Check that `path_or_uri` (a file, folder, glob, or pyarrow.fs URI) holds rows with the
    columns `task` needs; `columns` maps a task role to another column name ({"text": "body"}).
    Raises ConfigError with one line per problem: what, which file and column, and the fix."""
    if task not in TASK_COLUMNS:
        raise ConfigError(f"data.task: {task!r} is not one of {', '.join(TASK_COLUMNS)}")
    where = f"data.{role}"
    columns = dict(columns or {})
    roles = TASK_COLUMNS[task] + OPTIONAL_COLUMNS.get(task, ())
    unknown = sorted(set(columns) - set(roles))
    if unknown:
        raise ConfigError(
            f"data.columns: {', '.join(unknown)} is not a column of task {task}; use {', '.join(roles)}"
        )
    mapping = {r: columns.get(r, r) for r in roles}
    fs, files = list_files(str(path_or_uri), role)

    problems: list[str] = []
    rows, first_schema = 0, None
    for f in files:
        try:
            n, schema = _footer(fs, f, skip_bad_rows)
        except ValueError as e:
            fix = "fix that line or remove the file" if str(e).startswith("line ") else "rewrite the file or remove it"
            problems.append(f"{where}: {f} {e}; {fix} from the dataset")
            continue
        if first_schema is None:
            first_schema = schema
        rows += n
        found = _columns_of(task, mapping, columns, schema.names)
        for r, name in found.items():
            optional = r not in TASK_COLUMNS[task]
            if name not in schema.names:
                if optional and r not in columns:
                    continue
                hint = f"map it: columns={{'{r}': '<column>'}}" if name == r else "fix the mapping"
                also = ""
                if name == r and task == "chat":
                    also = " (or ShareGPT's 'conversations')"
                elif name == r and task == "instruction" and r in INSTRUCTION_ALIASES:
                    also = f" (nor {' or '.join(repr(a) for a in INSTRUCTION_ALIASES[r])})"
                problems.append(
                    f"{where}: {f} has no column '{name}'{also} that task {task} "
                    f"{'reads' if optional else 'needs'} as {r} (it has: {', '.join(schema.names)}); "
                    f"rename a column or {hint}"
                )
            elif not _type_ok(r, schema.field(name).type):
                problems.append(
                    f"{where}: column '{name}' in {f} is {schema.field(name).type}, task {task} "
                    f"needs {_NEEDS[r]}; convert the column or map another one"
                )
    if problems:
        problems = list(dict.fromkeys(problems))  # same problem in many files: keep the first lines
        extra = len(problems) - _MAX_LINES
        problems = problems[:_MAX_LINES] + ([f"{where}: ... and {extra} more"] if extra > 0 else [])
        raise ConfigError(problems)
    if rows == 0:
        raise ConfigError(f"{where}: {path_or_uri} has 0 rows in {len(files)} file(s); add data")
    return DatasetInfo(
        path=str(path_or_uri),
        rows=rows,
        files=len(files),
        schema={n: str(first_schema.field(n).type) for n in first_schema.names},
        columns={r: c for r, c in _columns_of(task, mapping, columns, first_schema.names).items()
                 if c in first_schema.names},  # an optional column the rows lack is not read
    )


def _columns_of(task: str, mapping: dict, columns: dict, names) -> dict[str, str]:
    """Role -> column in a file with these column `names`: a chat's turns are `messages`, else
    ShareGPT's `conversations`; an instruction set may be in Alpaca's, Dolly's or TRL's layout
    (common/chat.py, which the job reads rows with, decides)."""
    if task == "chat":
        return {**mapping, "messages": messages_column(columns, names)}
    if task == "instruction":
        return {**mapping, **instruction_columns(columns, names)}
    return mapping


def sufficiency(
    task: str, rows: int, *, peft: bool, force: bool = False, role: str = "train"
) -> list[str]:
    """Warnings when `rows` is below the task's usual minimum (PEFT: at most 500); a ConfigError
    below a tenth of it unless `force` (then that is a warning too)."""
    need = MINIMUM_ROWS[task]
    if peft:
        need = min(need, PEFT_MINIMUM_ROWS)
    method = "with PEFT " if peft else ""
    if rows >= need:
        return []
    if rows < math.ceil(need / 10):
        line = (
            f"data.{role}: {rows} rows is under a tenth of the ~{need:,} examples {task} "
            f"{method}needs"
        )
        if not force:
            raise ConfigError(f"{line}; add data or set data.force: true")
        return [f"{line}; running anyway because data.force is set"]
    return [
        f"data.{role}: {rows} rows is below the ~{need:,} examples {task} {method}usually needs; "
        "expect a weak result, or add data"
    ]


def steps_for(rows: int, epochs: float, micro_batch: int, workers: int) -> int:
    """Optimizer steps for `epochs` passes over `rows` split across `workers`, each taking
    `micro_batch` rows a step (a partial last batch counts as a step)."""
    if rows <= 0 or epochs <= 0 or micro_batch <= 0 or workers <= 0:
        raise ConfigError(
            f"steps_for: rows {rows}, epochs {epochs}, micro_batch {micro_batch} and workers "
            f"{workers} must all be positive"
        )
    if rows < workers:
        raise ConfigError(
            f"data.train: {rows} rows cannot feed {workers} workers (a worker would get none); "
            "add data or use fewer workers"
        )
    return max(1, math.ceil(epochs * math.ceil(rows / (micro_batch * workers))))
