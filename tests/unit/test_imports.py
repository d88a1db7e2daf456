"""The client stays light and data flows one way: launcher never imports torch or jobs."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "peft", "deepspeed", "bitsandbytes", "transformers")


def test_import_launcher_and_cli_load_no_heavy_library():
    code = (
        "import sys, launcher, launcher.cli.main; launcher.cli.main.parser();"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""


def test_launcher_never_imports_jobs_or_heavy_modules_at_module_level():
    for path in (ROOT / "launcher").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only; lazy imports inside functions are allowed
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top != "jobs", f"{path} imports jobs"
                assert top not in HEAVY, f"{path} imports {name} at module level"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jobs":
                raise AssertionError(f"{path} imports jobs")


# The cluster side reads the spec models, the error tree, the adapter registry and common/; never
# the planner, the CLI or the synthetic-data generator (launcher.dsconfig only for the pure ds_config).
FORBIDDEN_FOR_JOBS = ("launcher.estimate", "launcher.planner", "launcher.jobplan", "launcher.cli",
                      "launcher.synthetic")
ALLOWED_NAMES = {"launcher.dsconfig": {"ds_config"}}
# The one known exception: a raw `ray job submit -- python -m jobs.run --spec FILE` plans on the
# cluster (inside that one function).
EXCEPTIONS = {
    ("jobs/run.py", "launcher.jobplan"): {"plan"},
}


def _imported(tree):
    """Every import at any depth as (module, name); `import a.b` gives (a.b, None)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield from ((node.module, alias.name) for alias in node.names)


def test_jobs_import_no_planner_cli_or_generator():
    problems = []
    for path in sorted((ROOT / "jobs").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for module, name in _imported(ast.parse(path.read_text())):
            full = f"{module}.{name}" if name else module  # `from launcher import cli` is launcher.cli
            under = next((f for f in FORBIDDEN_FOR_JOBS if full == f or full.startswith(f + ".")), None)
            allowed = EXCEPTIONS.get((rel, under), set()) | EXCEPTIONS.get(("*", under), set())
            if under and name not in allowed:
                problems.append(f"{rel} imports {full}")
            if module in ALLOWED_NAMES and name not in ALLOWED_NAMES[module]:
                problems.append(f"{rel} imports {full}: only {sorted(ALLOWED_NAMES[module])} from there")
    assert not problems, problems


def test_common_imports_neither_side_nor_a_heavy_library_at_module_level():
    for path in sorted((ROOT / "common").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for module, _ in _imported(tree):
            assert module.split(".")[0] not in ("launcher", "jobs", "cluster"), f"{path} imports {module}"
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not [n for n in names if n.split(".")[0] in HEAVY], f"{path} imports {names} at module level"
