"""Synthetic, learnable datasets written as Parquet, deterministic by seed.

Client side (no torch): `ftlaunch data make NAME --rows N --out DIR` calls `make()`.
Each generator returns a pyarrow Table; a model can measurably get better at every one of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

GENERATORS: dict[str, Callable] = {}


def generator(name: str):
    def register(fn):
        if name in GENERATORS:
            raise RuntimeError(f"dataset generator {name!r} is registered twice")
        GENERATORS[name] = fn
        return fn

    return register


@generator("counting")
def counting(rows: int, seed: int = 0):
    """Causal-LM text: `count from 37: 37 38 39 ...`; the successor rule is learnable."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 900, size=rows)
    lengths = rng.integers(5, 9, size=rows)
    text = [
        f"count from {s}: " + " ".join(str(s + i) for i in range(n)) for s, n in zip(starts, lengths)
    ]
    return pa.table({"text": text})


@generator("alphabet")
def alphabet(rows: int, seed: int = 0):
    """Causal-LM text of another task (used as the retain set): `letters from k: k l m n`."""
    import pyarrow as pa

    letters = "abcdefghijklmnopqrstuvwxyz"
    rng = np.random.default_rng(seed + 1)
    starts = rng.integers(0, 16, size=rows)
    lengths = rng.integers(4, 10, size=rows)
    text = [
        f"letters from {letters[s]}: " + " ".join(letters[s : s + n]) for s, n in zip(starts, lengths)
    ]
    return pa.table({"text": text})


def make(name: str, rows: int, out: str | Path, seed: int = 0, split: str = "train") -> Path:
    """Write `<out>/<split>.parquet` from the named generator; returns the file path."""
    import pyarrow.parquet as pq

    from launcher.errors import ConfigError

    if name not in GENERATORS:
        raise ConfigError(f"unknown dataset {name!r}; use one of: {', '.join(sorted(GENERATORS))}")
    if rows <= 0:
        raise ConfigError(f"--rows {rows} must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.parquet"
    pq.write_table(GENERATORS[name](rows, seed), path)
    return path


def make_demo(out: str | Path, rows: int = 4000, seed: int = 0) -> dict[str, Path]:
    """The demo's splits: counting train/eval, alphabet retain (forgetting is measured on it)."""
    return {
        "train": make("counting", rows, out, seed, "train"),
        "eval": make("counting", max(64, rows // 10), out, seed + 100, "eval"),
        "retain": make("alphabet", max(64, rows // 10), out, seed, "retain"),
    }
