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
