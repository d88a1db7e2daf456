"""Ray Train's checkpoints of a run, as a resume finds them.

Each checkpoint folder carries a listing of the files each saving rank wrote (`Loop.report`), so
that a folder cut short (its upload, or a prune, killed mid-way) is told from a whole one. Before
a Ray Train run starts under a name that already has a run snapshot (a resume), `repair` drops
from that snapshot the checkpoints that are gone or cut short: the run continues from its last
whole checkpoint, or from the start, where Ray Train would refuse the folder as corrupted
("The run snapshot contains a reference to a checkpoint that does not exist anymore").

The snapshot is Ray Train 2.60's `checkpoint_manager_snapshot.json` (ray is pinned); a layout
this module does not know is left to Ray Train's own check.
"""

from __future__ import annotations

import json
import os
from typing import Optional

LISTING = ".ftl-checkpoint-rank{rank}.json"  # in a checkpoint folder: one per saving rank
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's, in the run's storage folder
_VALIDATION_KEYS = ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                    "failed_validation_checkpoint_dir_names")


def write_listing(folder: str, rank: int, ranks: int) -> None:
    """Record what `folder` (a checkpoint a rank just saved, not yet uploaded) holds: each file's
    size, and how many ranks save a part of this checkpoint."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    with open(os.path.join(folder, LISTING.format(rank=rank)), "w") as out:
        json.dump({"ranks": ranks, "files": files}, out)


def whole(fs, folder: str) -> bool:
    """Whether the checkpoint at `folder` (a path in pyarrow filesystem `fs`) holds every file
    its ranks' listings name, at their sizes. A folder without listings (written before them)
    is whole when it holds any file."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
    sizes = {i.path[len(folder):].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}
    listings = [rel for rel in sizes if rel.startswith(".ftl-checkpoint-rank") and rel.endswith(".json")]
    if not listings:
        return bool(sizes)
    ranks = None
    for rel in listings:
        try:
            with fs.open_input_stream(f"{folder}/{rel}") as src:
                listing = json.loads(src.read())
        except (OSError, ValueError):  # cut short itself
            return False
        ranks = listing.get("ranks", 1)
        if any(sizes.get(name) != size for name, size in listing.get("files", {}).items()):
            return False
    return len(listings) == ranks


def repair(storage: dict, name: str) -> list[str]:
    """Drop from the run snapshot of Ray Train run `name` (in `storage`: RunDir.ray_storage())
    the checkpoints that are gone or not whole; returns their folder names (none: untouched)."""
    import pyarrow.fs as pafs

    fs = storage.get("storage_filesystem") or pafs.LocalFileSystem()
    run = f"{str(storage['storage_path']).rstrip('/')}/{name}"
    try:
        with fs.open_input_stream(f"{run}/{SNAPSHOT}") as src:
            state = json.loads(src.read())
    except FileNotFoundError:
        return []  # a first attempt: nothing to repair
    except (OSError, ValueError):
        return []  # unreadable: Ray Train says so itself
    results, indices = state.get("checkpoint_results"), state.get("checkpoint_report_indices")
    if not isinstance(results, list) or not isinstance(indices, list) or len(results) != len(indices):
        return []
    gone = sorted({r["checkpoint_dir_name"] for r in results
                   if not whole(fs, f"{run}/{r['checkpoint_dir_name']}")})
    if not gone:
        return []
    state.update(_without(state, set(gone)))
    tmp = f"{run}/{SNAPSHOT}.{os.getpid()}.tmp"
    with fs.open_output_stream(tmp) as out:
        out.write(json.dumps(state).encode())
    fs.move(tmp, f"{run}/{SNAPSHOT}")
    return gone


def _without(state: dict, gone: set) -> dict:
    """The snapshot's fields with the checkpoints in `gone` taken out; the latest checkpoint is
    then the last one reported of those left (None: the run starts over)."""
    kept = [(r, i) for r, i in zip(state["checkpoint_results"], state["checkpoint_report_indices"])
            if r["checkpoint_dir_name"] not in gone]
    fields = {"checkpoint_results": [r for r, _ in kept], "checkpoint_report_indices": [i for _, i in kept]}
    latest: Optional[dict] = state.get("latest_checkpoint_result")
    if latest is not None and latest.get("checkpoint_dir_name") in gone:
        fields["latest_checkpoint_result"] = max(kept, key=lambda pair: pair[1])[0] if kept else None
    pending = list(zip(state.get("pending_training_results", []), state.get("pending_validation_specs", [])))
    pending = [(r, v) for r, v in pending if r.get("checkpoint_dir_name") not in gone]
    fields["pending_training_results"] = [r for r, _ in pending]
    fields["pending_validation_specs"] = [v for _, v in pending]
    for key in _VALIDATION_KEYS:
        if key in state:
            fields[key] = [n for n in state[key] if n not in gone]
    return fields
