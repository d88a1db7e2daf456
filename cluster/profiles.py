"""Cluster profiles (cluster/profiles.yaml): what one node holds, for the planner's fit checks.

No torch here: the client loads profiles. A `live: true` profile reads its CPUs and memory from
this machine each time it is loaded; `live: gpus` its NVIDIA GPUs too, as nvidia-smi reports them.
"""

from __future__ import annotations

import difflib
import functools
import os
import shutil
import subprocess
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
        if profile.get("live") == "gpus":
            profile.update(machine_gpu_fields())
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


# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by the name nvidia-smi gives: SXM parts
# where a name covers several; the planner's time estimate divides by it.
GPU_PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "GH200": 989, "A100": 312, "L40S": 362, "L40": 181,
                        "L4": 121, "A10": 125}
UNKNOWN_GPU_PEAK_TFLOPS = 100  # a GPU not in the table: its estimate says so


def machine_gpus() -> list[dict]:
    """This machine's NVIDIA GPUs that this process may use ({"name", "memory_mib"} each), as
    nvidia-smi reports them (and CUDA_VISIBLE_DEVICES leaves); [] where there is none. Asked once
    per process and environment: every profile load reads the live ones."""
    return [dict(g) for g in _machine_gpus(os.environ.get("PATH", ""), os.environ.get("CUDA_VISIBLE_DEVICES"))]


@functools.lru_cache(maxsize=8)
def _machine_gpus(path: str, visible: Optional[str]) -> tuple:
    smi = shutil.which("nvidia-smi", path=path)
    if not smi:
        return ()
    try:
        out = subprocess.run([smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    if out.returncode:
        return ()
    gpus = {}
    for line in out.stdout.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 3 and parts[2].isdigit():
            gpus[parts[0]] = {"name": parts[1], "memory_mib": int(parts[2])}
    if visible is not None:  # indices (UUIDs are not mapped here: all are kept)
        wanted = [x.strip() for x in visible.split(",") if x.strip()]
        if all(x.isdigit() for x in wanted):
            return tuple(gpus[x] for x in wanted if x in gpus)
    return tuple(gpus.values())


def machine_gpu_fields() -> dict:
    """A live GPU profile's GPU fields: the count the embedded head offers (FTLAUNCH_LOCAL_GPUS,
    else this machine's), and of this machine's GPUs the model, the smallest one's memory (a
    worker may land on any) and the model's bf16 peak."""
    from cluster.local import local_gpus

    offered, gpus = local_gpus(), machine_gpus()
    gpus = gpus[:offered] or gpus  # Ray hands out the first ones; more offered than seen: all seen
    if not offered or not gpus:
        return {"gpus": offered, "gpu_model": None, "gpu_memory_gib": 0, "peak_bf16_tflops": 0}
    model = gpus[0]["name"]
    peak = next((v for k, v in sorted(GPU_PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in model),
                UNKNOWN_GPU_PEAK_TFLOPS)
    return {"gpus": offered, "gpu_model": model, "peak_bf16_tflops": peak,
            "gpu_memory_gib": round(min(g["memory_mib"] for g in gpus) / 1024, 2)}


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
