"""Cluster profiles (cluster/profiles.yaml): what one node holds, for the planner's fit checks.

No torch here: the client loads profiles. A `live: true` profile reads its CPUs and memory from
this machine each time it is loaded.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Optional, Union

import yaml

from launcher.errors import PlanError

PROFILES_PATH = Path(__file__).with_name("profiles.yaml")
GIB = 2**30
FIELDS = ("nodes", "gpus", "gpu_model", "gpu_memory_gib", "peak_bf16_tflops", "cpus", "memory_gib")


def load_profiles(path: Union[str, Path, None] = None) -> dict[str, dict]:
    """Every profile by name, live ones filled in from this machine."""
    data = yaml.safe_load(Path(path or PROFILES_PATH).read_text())
    profiles = {}
    for name, raw in data.items():
        missing = [f for f in FIELDS if f not in raw]
        if missing:
            raise PlanError(f"profile {name!r} in {path or PROFILES_PATH} lacks {', '.join(missing)}")
        profile = {"name": name, **raw}
        if profile.get("live"):
            profile.update(machine_resources())
        profiles[name] = profile
    return profiles


def get_profile(name: str, path: Union[str, Path, None] = None) -> dict:
    """One profile by name; an unknown name fails with the closest known one."""
    profiles = load_profiles(path)
    if name not in profiles:
        hint = difflib.get_close_matches(name, profiles, n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else f"use one of: {', '.join(profiles)}"
        raise PlanError(f"cluster profile {name!r} is unknown; {fix}")
    return profiles[name]


def machine_resources() -> dict:
    """CPUs this process may use and total memory of this machine, in GiB."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return {"cpus": cpus, "memory_gib": round(_total_memory() / GIB, 2)}


def _total_memory() -> int:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().total)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def total_gpus(profile: dict) -> int:
    return int(profile["gpus"]) * int(profile["nodes"])


def gpu_profiles(names: Optional[list] = None) -> list[dict]:
    """Profiles in order of per-GPU memory, GPU profiles only (for 'a bigger GPU' suggestions)."""
    profiles = load_profiles()
    chosen = [p for n, p in profiles.items() if p["gpus"] and (names is None or n in names)]
    return sorted(chosen, key=lambda p: (p["gpu_memory_gib"], total_gpus(p)))
