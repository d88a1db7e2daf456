"""`hf:` model sources, torch-free and offline: a local folder, or `<org>/<name>[@<revision>]` found
in the local Hugging Face cache (what `hf download` wrote on a connected machine).

Both sides resolve through here: the plan records the snapshot folder a hub id names, and the job
(which may plan for itself, `python -m jobs.run --spec`) finds the same folder in its own cache.
The cache layout is huggingface_hub's: `models--<org>--<name>/refs/<revision>` holds a commit hash,
`snapshots/<hash>/` the files (symlinks into `blobs/`); a 40-hex revision names a snapshot directly.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Optional

HF = "hf:"
REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)(?:@(?P<rev>[\w.\-/]+))?")
COMMIT = re.compile(r"[0-9a-f]{40}")


class NotInCache(ValueError):
    """A hub id that is neither a folder nor in the local cache; the message is the one-line fix."""


def cache_dir() -> tuple[str, str]:
    """The hub cache folder and the setting that chose it, in huggingface_hub's order."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return _expand(os.environ[name]), name
    if os.environ.get("HF_HOME"):
        return os.path.join(_expand(os.environ["HF_HOME"]), "hub"), "HF_HOME"
    base = _expand(os.environ.get("XDG_CACHE_HOME") or "~/.cache")
    return os.path.join(base, "huggingface", "hub"), "default"


def repo_id(value: str) -> Optional[tuple[str, str]]:
    """(`org/name`, revision) when `value` reads as a hub id, else None. A revision defaults to main."""
    found = REPO_ID.fullmatch(value)
    if not found or ".." in value:
        return None
    return found["repo"], found["rev"] or "main"


def snapshot(repo: str, revision: str = "main", cache: Optional[str] = None) -> Optional[str]:
    """The snapshot folder of `repo` at `revision` in the cache, or None."""
    root = os.path.join(cache or cache_dir()[0], "models--" + repo.replace("/", "--"))
    commit = revision if COMMIT.fullmatch(revision) else None
    if commit is None:
        ref = os.path.join(root, "refs", *revision.split("/"))
        try:
            with open(ref, encoding="utf-8") as f:
                commit = f.read().strip()
        except OSError:
            return None
        if not COMMIT.fullmatch(commit):
            return None
    folder = os.path.join(root, "snapshots", commit)
    return folder if os.path.isdir(folder) else None


def resolve(value: str, to_path: Optional[Callable[[str], str]] = None) -> str:
    """The folder an `hf:` source (without the prefix) loads from: an existing folder (relative
    paths through `to_path`, e.g. against the spec's folder) as it is; else a hub id's snapshot in
    the local cache; a hub id that is not there raises NotInCache; anything else is a path."""
    path = os.path.expanduser(value)
    path = to_path(path) if to_path else path
    if os.path.isdir(path):
        return path
    hub = repo_id(value)
    if hub is None:
        return path
    repo, revision = hub
    cache, setting = cache_dir()
    folder = snapshot(repo, revision, cache)
    if folder is None:
        at = "" if revision == "main" else f" at revision {revision}"
        chosen = "" if setting == "default" else f" (from {setting})"
        raise NotInCache(
            f"model.source: {HF}{value} is no folder and {repo}{at} is not in the Hugging Face cache "
            f"{cache}{chosen}; on a connected machine run `hf download {repo}"
            f"{'' if revision == 'main' else ' --revision ' + revision}` (huggingface-cli download before "
            f"huggingface_hub 1.0) and copy the cache here (or set HF_HUB_CACHE), or use {HF}<model folder>")
    return folder


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))
