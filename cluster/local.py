"""The embedded local Ray head: started on loopback, found again by its state file, stopped by pid.

The head runs as `ray start --head --block` in a process group of its own, so stopping it kills
exactly the processes this module started and never anyone else's (no `ray stop`).
Ray's token authentication is on: loopback is shared by every account of the machine, and a head
that takes jobs from anyone runs their code as its owner. The token lives in FTLAUNCH_HOME
(`auth_token`, mode 0600), made at the first `up`; every ftlaunch client of the head passes it
(RAY_AUTH_TOKEN_PATH). FTLAUNCH_RAY_AUTH_MODE=disabled turns it off, with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from launcher.capacity import DRIVER_SLOT
from launcher.errors import ClusterError

HOST = "127.0.0.1"
# Set for the head and every client of it, so no process turns token auth on by accident.
HEAD_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # else 127.0.0.1 is rewritten to an external address
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    # Jobs queued for a driver slot wait in Ray's job manager as PENDING; Ray fails a job pending
    # past this (default 900 s). A queue of submissions may wait behind hours of training.
    "RAY_JOB_START_TIMEOUT_SECONDS": str(7 * 24 * 3600),
}


WORKERS_KEPT_PER_CPU = 4  # idle Ray worker processes the embedded head keeps warm, per CPU
MIN_DRIVER_SLOTS = 4  # ftlaunch drivers the embedded head runs at once: its CPUs, at least this


def driver_slots(num_cpus: int) -> int:
    """How many jobs' drivers the embedded head runs at once (FTLAUNCH_DRIVER_SLOTS, else its
    CPUs, at least MIN_DRIVER_SLOTS); the others wait PENDING with no process of their own."""
    return int(os.environ.get("FTLAUNCH_DRIVER_SLOTS") or 0) or max(MIN_DRIVER_SLOTS, num_cpus)


def home() -> Path:
    """Where the embedded head keeps its state and temp dir (FTLAUNCH_HOME, else ~/.ftlaunch)."""
    return Path(os.environ.get("FTLAUNCH_HOME", Path.home() / ".ftlaunch"))


def auth_mode() -> str:
    """"token" (the default) or "disabled" (FTLAUNCH_RAY_AUTH_MODE=disabled: anyone on the machine
    can submit code to the head)."""
    mode = os.environ.get("FTLAUNCH_RAY_AUTH_MODE", "token").strip().lower()
    if mode not in ("token", "disabled"):
        raise ClusterError(f"FTLAUNCH_RAY_AUTH_MODE={mode!r} is not token or disabled; unset it (token)")
    return mode


def auth_warning() -> str | None:
    """The line `cluster up` prints when the head will take any client: FTLAUNCH_RAY_AUTH_MODE=disabled."""
    if auth_mode() != "disabled":
        return None
    return ("ftlaunch: warning: the embedded head runs without token authentication "
            "(FTLAUNCH_RAY_AUTH_MODE=disabled): any user of this machine can submit code to it, which runs as you")


def token_path() -> Path:
    return home() / "auth_token"


def ensure_token() -> Path:
    """The head's token file, made (random, mode 0600) when there is none."""
    import secrets

    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def auth_env() -> dict:
    """What a process needs in its environment to talk to the embedded head."""
    if auth_mode() == "disabled":
        return {"RAY_AUTH_MODE": "disabled"}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path())}


def auth_headers() -> dict:
    """The Authorization header of this process's Ray token (RAY_AUTH_TOKEN, else the file
    RAY_AUTH_TOKEN_PATH names), when RAY_AUTH_MODE is token; {} otherwise."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass
class Head:
    pid: int
    address: str  # the Jobs API (dashboard) address
    gcs_address: str
    temp_dir: str
    num_cpus: int
    log: str
    num_gpus: int = 0

    @property
    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return _dashboard_up(self.address)


def _state_file() -> Path:
    return home() / "head.json"


def recorded() -> Optional[Head]:
    """The head this FTLAUNCH_HOME recorded, alive or not (no request is made)."""
    try:
        return Head(**json.loads(_state_file().read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def status() -> Optional[Head]:
    """The recorded head if it is still running, else None (a stale record is removed)."""
    try:
        head = Head(**json.loads(_state_file().read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    if head.alive:
        return head
    _state_file().unlink(missing_ok=True)
    return None


def client_env() -> None:
    """Make this process a well-behaved client of the embedded head."""
    for key, value in HEAD_ENV.items():
        os.environ.setdefault(key, value)
    if auth_mode() == "disabled":
        os.environ["RAY_AUTH_MODE"] = "disabled"
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    elif token_path().is_file():  # none yet: no head of this FTLAUNCH_HOME to talk to (up makes it)
        os.environ.update(auth_env())


def local_gpus() -> int:
    """The GPUs the embedded head offers: FTLAUNCH_LOCAL_GPUS, else this machine's (nvidia-smi,
    within CUDA_VISIBLE_DEVICES)."""
    from cluster.profiles import machine_gpus

    set_ = os.environ.get("FTLAUNCH_LOCAL_GPUS", "").strip()
    if set_:
        if not set_.isdigit():
            raise ClusterError(f"FTLAUNCH_LOCAL_GPUS={set_!r} is not a whole number; set it to 0 or more, or unset it")
        return int(set_)
    return len(machine_gpus())


def head_command(ray: str, ports: dict, temp_dir: Path, num_cpus: int, num_gpus: int) -> list[str]:
    """`ray start` of the embedded head. Every fixed default port is replaced by a free one, so two
    heads on one machine coexist (the dashboard agent's default 52365 would otherwise collide and
    leave no job agent)."""
    return [
        ray, "start", "--head", "--block",
        f"--node-ip-address={HOST}", f"--port={ports['gcs']}",
        "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client']}",
        f"--dashboard-agent-listen-port={ports['agent']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['env_agent']}", f"--metrics-export-port={ports['metrics']}",
        f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
        f"--resources={json.dumps({DRIVER_SLOT: driver_slots(num_cpus)})}",
        "--disable-usage-stats",
    ]


def up(num_cpus: Optional[int] = None, timeout: float = 90.0) -> Head:
    """Start the embedded head, or return the one already running."""
    if auth_mode() == "token":
        ensure_token()
    client_env()
    running = status()
    if running:
        return running
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if not ray:
        raise ClusterError("the 'ray' command is not installed; pip install 'ray[default]==2.60.0'")
    base = home()
    base.mkdir(parents=True, exist_ok=True)
    # Ray's socket paths must stay short (AF_UNIX limit), so the temp dir is a short one of ours.
    temp_dir = Path(os.environ.get("FTLAUNCH_RAY_TMP", "/tmp")) / f"ftl-{os.getuid()}-{os.getpid()}"
    num_cpus = num_cpus or int(os.environ.get("FTLAUNCH_LOCAL_CPUS", 0)) or (os.cpu_count() or 2)
    num_gpus = local_gpus()
    ports = dict(zip(("gcs", "dashboard", "client", "agent", "agent_grpc", "env_agent", "metrics"), _free_ports(7)))
    cmd = head_command(ray, ports, temp_dir, num_cpus, num_gpus)
    warning = auth_warning()
    if warning:
        sys.stderr.write(warning + "\n")
    env = {**os.environ, **HEAD_ENV, **auth_env()}
    # Ray keeps as many idle task workers as the head has CPUs and kills the rest after a second
    # idle. K adapter workers beside their K data streams need more than that, and a data task
    # that finds none waits for a fresh process to start and import its libraries while the K
    # workers hold the cores: 16% of B4's cores sat idle so (bench/results/b4_fanout.json).
    env.setdefault("RAY_num_workers_soft_limit", str(WORKERS_KEPT_PER_CPU * num_cpus))
    # Jobs run `python`: make it this environment's interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = base / "head.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
    head = Head(
        pid=proc.pid, address=f"http://{HOST}:{ports['dashboard']}", gcs_address=f"{HOST}:{ports['gcs']}",
        temp_dir=str(temp_dir), num_cpus=num_cpus, log=str(log), num_gpus=num_gpus,
    )
    deadline = time.monotonic() + timeout
    while not _dashboard_up(head.address):
        if proc.poll() is not None:
            raise ClusterError(f"the local Ray head exited with code {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            _kill_group(proc.pid)
            raise ClusterError(f"the local Ray head did not start within {timeout:.0f}s; see {log}")
        time.sleep(0.25)
    _state_file().write_text(json.dumps(asdict(head), indent=1))
    return head


def down() -> bool:
    """Stop the recorded head and every process it started. Returns whether one was running."""
    try:
        head = Head(**json.loads(_state_file().read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return False
    _kill_group(head.pid)
    _state_file().unlink(missing_ok=True)
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    return True


def _kill_group(pid: int) -> None:
    """SIGTERM the head's process tree, then SIGKILL what is left (some Ray processes ignore TERM)."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        pgid = None
    # Members of the head's own process group, even if re-parented (daemonised Ray processes).
    if pgid is not None:
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) == pgid and proc not in tree:
                    tree.append(proc)
            except (ProcessLookupError, psutil.Error):
                continue
    for proc in tree:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(tree, timeout=8)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _dashboard_up(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=2) as resp:
            return resp.status == 200
    except urllib.error.HTTPError as exc:  # it answers: up (a 401 asks for the token it checks)
        return exc.code in (401, 403)
    except OSError:
        return False


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((HOST, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports
