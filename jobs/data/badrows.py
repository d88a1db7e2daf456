"""Bad rows in the middle of a stream: found, named by file and row group or line, and either
skipped (up to `data.skip_bad_rows`) or the job's one-line end.

The pre-flight (launcher/datacheck.py) reads footers and first lines; a row that cannot be used
shows only when the stream reaches it. Two kinds:

- rows that decode but cannot be trained on (text null or not a string, over `data.max_row_chars`,
  a conversation of the wrong shape): `encode` (jobs/text.py) turns each into a marker row
  (`BAD_COLUMN` = 1, no tokens) in its place, and the consumer (jobs/data/ingest.py) drops the
  markers, counts them and ends the job past the limit;
- bytes that do not decode (a Parquet row group, a JSON line): the read task fails, and the
  consumer turns Ray's error into the same line.

Either way the line names where the row is: found by reading the split's files here, in order,
with the same checks (`first_bad`), only once something is known to be bad.
"""

from __future__ import annotations

import json
import re

import numpy as np
from typing import Iterable, Iterator, Optional

from jobs.watch import NoRetry
from launcher.spec import DataSpec

BAD_ROWS_DIR = "bad-rows"  # in the run folder: each worker's count of skipped rows
BAD_COLUMN = "bad_row"  # 1 on a marker row standing for a row that could not be used
FIX = ("fix or remove it, or set data.skip_bad_rows: N to skip up to N bad rows "
       "(they are counted in the summary)")
# Errors of a read task that mean its bytes did not decode (Ray's error keeps the cause's text)
DECODE = re.compile(r"ArrowInvalid|ArrowException|ArrowIOError|ArrowNotImplemented|Parquet|"
                    r"JSON parse error|Corrupt|decompression|Couldn't deserialize|snappy|zstd|Invalid", re.I)


class BadRowsError(NoRetry, ValueError):
    """A bad row the job may not skip: its one line names it, where it is, and the fix. A retry
    would meet it again: the job ends (jobs/watch.py NoRetry)."""


def row_problem(row: dict, data: DataSpec) -> Optional[str]:
    """Why a decoded row of a text task (causal LM, instruction, chat, classification) cannot be
    trained on; None when it can."""
    from common.chat import instruction_columns, instruction_messages, messages_column, normalise

    cols, limit = data.columns, data.max_row_chars
    if data.task == "classification":
        label = cols.get("label", "label")
        value = row.get(label)
        if value is None or (isinstance(value, float) and value != value):  # a stream's null is NaN
            return f"{label} is null"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            return f"{label} is {_kind(value)} ({value!r}), not a class number"
        column = cols.get("text", "text")
        return _text_problem(row.get(column), column, limit)
    if data.task == "causal_lm":
        column = cols.get("text", "text")
        return _text_problem(row.get(column), column, limit)
    if data.task == "instruction":
        named = instruction_columns(cols, row.keys())
        for role in ("instruction", "response"):
            column = named[role]
            problem = _text_problem(row.get(column), column, limit)
            if problem:
                return problem
        texts = [m["content"] for m in instruction_messages(row, named)]
    elif data.task == "chat":
        column = messages_column(cols, row.keys())
        turns = row.get(column)
        if turns is None:
            return f"{column} is null"
        try:
            for i, turn in enumerate(turns):
                content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
                if content is not None and not isinstance(content, str):
                    return f"{column} turn {i}: content is {_kind(content)}, not a string"
            texts = [m["content"] for m in normalise(turns)]
        except (ValueError, TypeError, AttributeError) as exc:
            return f"{column}: {exc}"
    elif data.task == "vqa":
        if row.get("image") is None:
            return "image is null"
        for column in ("question", "answer"):
            problem = _text_problem(row.get(column), column, limit)
            if problem:
                return problem
        return None
    else:
        return None
    chars = sum(len(t) for t in texts)
    return f"the row has {chars:,} characters, over data.max_row_chars {limit:,}" if chars > limit else None


def _text_problem(value, column: str, limit: int) -> Optional[str]:
    if value is None:
        return f"{column} is null"
    if not isinstance(value, str):
        return f"{column} is {_kind(value)}, not a string"
    if len(value) > limit:
        return f"{column} has {len(value):,} characters, over data.max_row_chars {limit:,}"
    return None


def _kind(value) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), f"a {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# Where: the first bad row of a split, found by reading its files in order


def first_bad(paths: Iterable[str], data: DataSpec, columns: Optional[list[str]] = None) -> Optional[str]:
    """'<file> <where>: <problem>' for the first row of `paths` (data specs: file, folder, glob,
    URI) that does not decode or cannot be trained on; None when every row is good."""
    from launcher.datacheck import ARROW_IPC, is_jsonl, list_files

    for path in paths:
        if not path:
            continue
        fs, files = list_files(path, "train")
        for f in files:
            if is_jsonl(f):
                found = _jsonl(fs, f, data)
            elif f.lower().endswith(ARROW_IPC):
                found = _ipc(fs, f, data, columns)
            else:
                found = _parquet(fs, f, data, columns)
            if found:
                return f"{f} {found}"
    return None


def _jsonl(fs, path: str, data: DataSpec) -> Optional[str]:
    import io

    with fs.open_input_stream(path) as raw:  # .gz decompressed by the file's ending
        for n, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                return f"line {n}: not JSON ({exc.args[0].split(':')[0]})"
            if not isinstance(row, dict):
                return f"line {n}: {_kind(row)}, not a JSON object"
            problem = row_problem(row, data)
            if problem:
                return f"line {n}: {problem}"
    return None


def _parquet(fs, path: str, data: DataSpec, columns) -> Optional[str]:
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as src:
        try:
            pf = pq.ParquetFile(src)
        except Exception as exc:  # noqa: BLE001 -- pyarrow raises several kinds for a bad footer
            return f"footer: cannot be read ({_short(exc)})"
        start = 0
        for g in range(pf.num_row_groups):
            try:
                table = pf.read_row_group(g, columns=columns)
            except Exception as exc:  # noqa: BLE001 -- a corrupt page: ArrowInvalid, OSError, ...
                return f"row group {g} (rows {start}-{start + pf.metadata.row_group(g).num_rows - 1}): " \
                       f"does not decode ({_short(exc)})"
            found = _table(table, data)
            if found is not None:
                i, problem = found
                return f"row group {g}, row {start + i}: {problem}"
            start += table.num_rows
    return None


def _ipc(fs, path: str, data: DataSpec, columns) -> Optional[str]:
    from jobs.data.read import read_ipc

    try:
        table = read_ipc(fs, path, columns)
    except Exception as exc:  # noqa: BLE001
        return f"does not decode ({_short(exc)})"
    found = _table(table, data)
    return None if found is None else f"row {found[0]}: {found[1]}"


def _table(table, data: DataSpec) -> Optional[tuple[int, str]]:
    for i, row in enumerate(table.to_pylist()):
        problem = row_problem(row, data)
        if problem:
            return i, problem
    return None


def _short(exc: BaseException) -> str:
    text = " ".join("".join(c if c.isprintable() else " " for c in str(exc)).split())
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------------------------------------
# The consumer's side


class RowGuard:
    """What a stream's consumer does with bad rows: counts the markers, drops them, and raises
    BadRowsError (where the first is, and the fix) once more than `data.skip_bad_rows` were met;
    a read that failed to decode is named the same way (`decode_failure`).

    The limit is the job's, per pass over the split: with `ledger` (a folder in the run folder)
    each worker keeps its count of this pass in `<ledger>/rank-<r>.json` and the sum of every
    worker's is what is checked, and what the summary reports (`skipped_rows`)."""

    def __init__(self, data: DataSpec, paths: Iterable[str], columns: Optional[list[str]] = None,
                 ledger: Optional[str] = None, rank: int = 0):
        self.data, self.paths, self.columns = data, [p for p in paths if p], columns
        self.limit, self.skipped = data.skip_bad_rows, 0
        self.ledger, self.rank = ledger, rank

    def begin_pass(self) -> None:
        self.skipped = 0
        if self.ledger and self._file().exists():
            self._write()

    def take(self, table):
        """`table` (pyarrow) without its marker rows and the marker column, and the error to raise
        once those rows are used (None while within the limit): the rows before the first bad row
        over the limit are trained on, as they would be were that row the file's end."""
        import pyarrow.compute as pc

        if BAD_COLUMN not in table.column_names:
            return table, None
        flags = table.column(BAD_COLUMN)
        bad = pc.sum(flags).as_py() or 0
        table = table.drop_columns([BAD_COLUMN])
        if not bad:
            return table, None
        before = skipped_rows(self.ledger) - self.skipped if self.ledger else 0  # the other workers'
        allowed = max(0, self.limit - before - self.skipped)  # markers of this table within the limit
        self.skipped += min(bad, allowed + 1)
        if self.ledger:
            self._write()
        keep = pc.equal(flags, 0)
        if bad <= allowed:
            return table.filter(keep), None
        over = np.flatnonzero(np.asarray(flags.to_numpy(zero_copy_only=False)) == 1)[allowed]
        total = before + self.skipped
        error = self.error(f"{total} bad rows, over data.skip_bad_rows {self.limit}")
        return table.slice(0, over).filter(keep.slice(0, over)), error

    def _file(self):
        from pathlib import Path

        return Path(self.ledger) / f"rank-{self.rank}.json"

    def _write(self) -> None:
        from common.runfolder import write_bytes_atomic

        self._file().parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self._file(), json.dumps({"skipped": self.skipped}).encode())

    def error(self, what: str) -> BadRowsError:
        where = first_bad(self.paths, self.data, self.columns)
        return BadRowsError(f"bad row in the train data: {where or what}; {FIX}")

    def decode_failure(self, exc: BaseException) -> Optional[BadRowsError]:
        """The one line for a read that failed on bytes that do not decode; None for other errors."""
        if isinstance(exc, BadRowsError) or not DECODE.search(f"{type(exc).__name__} {exc}"):
            return None
        where = first_bad(self.paths, self.data, self.columns)
        if where is None:
            return None
        # A row that does not decode cannot be skipped one by one: its neighbours went with it.
        return BadRowsError(f"bad data in the train split: {where}; fix or remove it "
                            "(a row group or line that does not decode cannot be skipped)")


def named_failures(batches: Iterable, data: DataSpec, columns: Optional[list[str]] = None) -> Iterator:
    """`batches` (a stream whose rows are not marked: an ARR-COC stage's, through its VQA batch
    function) with a failed read named by the train split's first bad row, when it has one: a
    row group or line that does not decode, or a row that cannot be used (a null question, ...).
    Such a stream cannot skip rows: the line says to fix or remove it."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except BadRowsError:
            raise
        except Exception as exc:
            where = first_bad([data.train], data, columns)
            if where is None:
                raise
            raise BadRowsError(f"bad row in the train data: {where}; fix or remove it "
                               f"(a {data.task} stream cannot skip rows)") from exc
        yield batch


def skipped_rows(ledger) -> int:
    """Bad rows skipped in the current pass, summed over the workers' counts in `ledger`."""
    from pathlib import Path

    total = 0
    for f in Path(ledger).glob("rank-*.json") if Path(ledger).is_dir() else ():
        try:
            total += int(json.loads(f.read_text()).get("skipped", 0))
        except (ValueError, OSError):
            continue
    return total


def train_guard(data: DataSpec, run_path, rank: int, columns: Optional[list[str]] = None,
                ledger: str = BAD_ROWS_DIR) -> RowGuard:
    """A worker's counter of the bad rows its stream meets (the train split, and the replay split
    mixed into it), sharing the job's limit with the other workers through the run folder."""
    from pathlib import Path

    paths = [data.train, data.replay.path if data.replay else None]
    return RowGuard(data, paths, columns, ledger=str(Path(run_path) / ledger), rank=rank)
