"""The adapter registry of a multitask run: `<run_dir>/registry.json`, read without torch.

{"base": {"id", "path"}, "tokenizer": "tokenizer", "adapters": {task: {"path", "base_id",
"base_sha256", "sha256", "bytes", "eval", "created", ...}}}; paths are relative to the run folder.
The job writes one entry per finished adapter; a resumed run keeps the entries whose files
still hash to what was recorded and retrains the rest.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Union

from common.runfolder import REGISTRY, dir_size, run_path, write_json
from launcher.errors import LauncherError

FILE = REGISTRY


def load_registry(run_dir: Union[str, Path]) -> dict:
    """The registry of a run folder; an empty one when no adapter has been registered yet."""
    try:
        return json.loads((Path(run_dir) / FILE).read_text())
    except FileNotFoundError:
        return {"base": None, "tokenizer": None, "adapters": {}}
    except ValueError as exc:
        raise LauncherError(f"{Path(run_dir) / FILE} is not valid JSON ({exc}); rerun the job") from None


def save_registry(run_dir: Union[str, Path], registry: dict) -> None:
    write_json(Path(run_dir) / FILE, registry)  # atomic: a reader never sees half a registry


def register(run_dir: Union[str, Path], task: str, entry: dict, base: dict, tokenizer: str) -> dict:
    """Add (or replace) one adapter's entry, with its size and content hash measured here."""
    registry = load_registry(run_dir)
    adapter = Path(run_dir) / entry["path"]
    registry["base"], registry["tokenizer"] = base, tokenizer
    registry["adapters"][task] = {
        **entry, "bytes": dir_size(adapter), "sha256": dir_sha256(adapter),
        "created": entry.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_registry(run_dir, registry)
    return registry


def intact(run_dir: Union[str, Path], entry: dict) -> bool:
    """Whether a registered adapter's files are still there, unchanged."""
    path = Path(run_dir) / entry["path"]
    return path.is_dir() and dir_sha256(path) == entry.get("sha256")


def resolve_run(run: str, storage: str = "./runs") -> Path:
    """A run folder, or a run id under `storage`; raises when neither holds a registry."""
    path = run_path(run, storage)
    if not (path / FILE).is_file():
        raise LauncherError(f"no adapter registry at {path / FILE}; pass a multitask run folder "
                            "or its run id with --storage")
    return path


def dir_sha256(path: Path) -> str:
    """A content hash of a folder: file names and bytes, in sorted order."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()
