"""The training loops' one ingest path: a Ray Data iterator's rows as micro-batches of tensors.

Ray Data pays a fixed cost for every batch it hands out (its collate, the iterator's bookkeeping:
about half a millisecond here, bench/b2_ingest.py), which at a micro-batch of 8 rows is most of
the time spent on data. So rows are fetched in batches of about FETCH_BYTES as Arrow tables,
turned into tensors without a copy where the types allow (moved to the training device once) and
cut into micro-batches as views.
The micro-batches are those of `iter_torch_batches(batch_size=micro, drop_last=True)` on the same
iterator, in the same order: only cheaper (tests/integration/test_ingest.py).
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow.compute as pc
import torch

from jobs.data.badrows import BAD_COLUMN, FIX, BadRowsError, RowGuard

FETCH_BYTES = 4 << 20  # per fetched batch: Ray's per-batch cost is then a few percent of the copy
ROW_COLUMNS = 5  # model rows carry up to five int64 columns (ids, labels, mask, segments, positions)


def fetch_rows(micro: int, seq_len: int) -> int:
    """Rows per fetch: a multiple of `micro`, about FETCH_BYTES of int64 model rows of `seq_len`."""
    per_row = max(1, seq_len) * 8 * ROW_COLUMNS
    return max(1, FETCH_BYTES // per_row // micro) * micro


def micro_batches(it, micro: int, seq_len: int, *, dtype: Optional[torch.dtype] = torch.long,
                  device="auto", prefetch: int = 2, guard: Optional[RowGuard] = None) -> Iterator[dict]:
    """One pass over `it` (a Ray DataIterator or Dataset) as dicts of tensors of `micro` rows; the
    last partial micro-batch is dropped. `dtype`: what integer columns become (None: as read);
    `device`: "auto" is Ray Train's device for this worker (the CPU outside Ray Train). `guard`:
    the bad rows' counter (jobs/data/badrows.py; None: the first marker row ends the pass)."""
    device = _train_device() if device == "auto" else device
    if guard is not None:
        guard.begin_pass()
    leftover: dict = {}
    for table in _fetches(it, fetch_rows(micro, seq_len), prefetch, guard):
        batch = {k: _tensor(_numpy(table.column(k)), dtype, device) for k in table.column_names}
        if leftover:  # the rows the last fetch could not fill a micro-batch with come first
            batch = {k: torch.cat([leftover[k], batch[k]]) for k in batch}
        n = len(next(iter(batch.values())))
        whole = n - n % micro
        for i in range(0, whole, micro):
            yield {k: v[i:i + micro] for k, v in batch.items()}
        leftover = {k: v[whole:] for k, v in batch.items()} if whole < n else {}


def endless(stream: Callable[[], Iterator[dict]], task: Optional[str] = None) -> Iterator[dict]:
    """Pass after pass over a task's batches (`stream()` starts a pass): a multitask worker or
    mix asks a task for as many batches as its steps or weight say."""
    while True:
        empty = True
        for batch in stream():
            empty = False
            yield batch
        if empty:
            where = f"tasks.{task}: " if task else ""
            raise ValueError(f"{where}the train split yields no full micro-batch; lower train.micro_batch")


def _fetches(it, rows: int, prefetch: int, guard: Optional[RowGuard]) -> Iterator:
    """The fetched Arrow tables, bad rows dropped and counted; a read that failed on bytes that
    do not decode raised as the one line that names them."""
    batches = iter(it.iter_batches(batch_size=rows, batch_format="pyarrow", prefetch_batches=prefetch,
                                   drop_last=False))
    try:
        while True:
            try:
                table = next(batches)
            except StopIteration:
                return
            except Exception as exc:
                named = guard.decode_failure(exc) if guard is not None else None
                if named is None:
                    raise
                raise named from exc
            error = None
            if guard is not None:
                table, error = guard.take(table)
            elif BAD_COLUMN in table.column_names:
                if pc.sum(table.column(BAD_COLUMN)).as_py():
                    raise BadRowsError(f"a bad row in the stream; {FIX}")
                table = table.drop_columns([BAD_COLUMN])
            if table.num_rows:
                yield table
            if error is not None:  # after the good rows before it
                raise error
    finally:  # now, not when collected (by then Ray may be gone): Ray's iterator ends its execution
        close = getattr(batches, "close", None)
        if close is not None:
            close()


class Stream:
    """Passes of micro_batches over one iterator. The first pass starts at once, in a thread that
    fetches its first micro-batch while the worker builds its model and runs its before-training
    eval: the read's start (a second or two of Ray Data planning and task launch) is off the time
    to the first step. Iterating a Stream is one pass; every later pass is a plain micro_batches."""

    def __init__(self, it, micro: int, seq_len: int, **kwargs):
        self._args, self._kwargs = (it, micro, seq_len), kwargs
        self._first: Optional[Iterator[dict]] = micro_batches(it, micro, seq_len, **kwargs)
        self._head: list = []
        self._error: Optional[BaseException] = None
        self._warm = threading.Thread(target=self._fetch_head, name="ingest-first-batch", daemon=True)
        self._warm.start()

    def _fetch_head(self) -> None:
        try:
            self._head = [next(self._first)]
        except StopIteration:
            pass
        except BaseException as e:  # raised in the training thread, where it can end the run
            self._error = e

    def __iter__(self) -> Iterator[dict]:
        if self._first is None:
            yield from micro_batches(*self._args, **self._kwargs)
            return
        self._warm.join()
        first, self._first = self._first, None
        if self._error is not None:
            raise self._error
        yield from self._head
        yield from first


def _numpy(column) -> np.ndarray:
    """An Arrow column as one ndarray, without a per-row step: fixed-size lists (token ids read
    from Parquet) and Ray's tensor columns (what map_batches wrote) as 2-D arrays."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_fixed_size_list(array.type):
        values = array.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(len(array), array.type.list_size)
    if isinstance(array, pa.ExtensionArray) and hasattr(array, "to_numpy"):
        return array.to_numpy()  # Ray's ArrowTensorArray
    return array.to_numpy(zero_copy_only=False)


def _tensor(array: np.ndarray, dtype, device) -> torch.Tensor:
    if array.dtype == object:  # variable-length lists: one array per row
        array = np.stack(array)
    with warnings.catch_warnings():  # read-only views of Ray's blocks, as iter_torch_batches gives
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(array))
    if dtype is not None and not t.is_floating_point() and t.dtype != torch.bool and t.dtype != dtype:
        t = t.to(dtype)
    return t.to(device) if device is not None else t


def _train_device():
    import ray.train.torch

    try:
        return ray.train.torch.get_device()
    except RuntimeError:  # "cannot be used outside of a Ray Train training function"
        return None
