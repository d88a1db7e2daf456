"""`make demo` end to end on the session's local Ray head: configs/demo.yaml (LoRA chat SFT) on a
Qwen2-layout folder (`ftlaunch model make qwen2`) and chat JSONL (`ftlaunch data make chat`),
submitted through the CLI as the Makefile does; the run learns the creature -> colour lookup (exact
match of greedy answers from ~0 to >= 0.9), the console shows only ftlaunch's lines and the readable
summary, and `ftlaunch infer` answers the Makefile's question right."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import ROOT
from tests.integration.test_jobs import cli

pytestmark = pytest.mark.integration


def makefile_value(name: str) -> str:
    """A `NAME := value` of the Makefile (the demo's question and system line)."""
    found = re.search(rf"^{name}\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert found, f"Makefile has no {name}"
    return found.group(1).strip()


def test_make_demo_learns_the_lookup_quietly_and_infer_answers_it(ray_head, tmp_path):
    from launcher.modelmake import make_model
    from launcher.synthetic import CREATURES, creature_colour, make_splits

    folder = make_model("qwen2", tmp_path / "q")  # what `make demo` makes, at the demo spec's paths
    data = make_splits("chat", 4000, tmp_path / "chat", fmt="jsonl")
    storage = tmp_path / "runs"
    out = cli("submit", "configs/demo.yaml", "--submission-id", "it-demo", "--address", ray_head.address,
              f"model.source=hf:{folder}", f"data.train={data['train']}", f"data.eval={data['eval']}",
              f"storage={storage}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    s = json.loads((storage / "it-demo" / "manifest.json").read_text())["summary"]
    assert s["eval_exact_match_before"] < 0.2, s
    assert s["eval_exact_match_after"] >= 0.9, s

    # Quiet: the submit lines, a progress line per report, the readable summary; no Ray or library lines.
    lines = out.stdout.splitlines()
    progress = [int(m.group(1)) for m in map(re.compile(r"^\[ftlaunch\] step (\d+)/300 loss").match, lines) if m]
    assert progress == [50, 100, 150, 200, 250, 300], out.stdout
    assert re.search(r"^exact match\s+\d+\.\d% -> 9\d\.\d%|^exact match\s+\d+\.\d% -> 100\.0%", out.stdout, re.M)
    assert "[ftlaunch] summary {" not in out.stdout and "INFO" not in out.stdout
    assert "Warning" not in out.stdout and "pid=" not in out.stdout

    # The Makefile's question, asked as it was trained (the data's system line).
    question = makefile_value("DEMO_QUESTION")
    creature = next(c for c in CREATURES if f" {c}." in question or f" {c}?" in question)
    infer = cli("infer", str(storage / "it-demo"), "--input", question, "--system", makefile_value("DEMO_SYSTEM"))
    assert infer.returncode == 0, infer.stderr[-3000:]
    assert infer.stdout.strip() == f"The {creature} is {creature_colour(creature)}."
    assert "Warning" not in infer.stderr, infer.stderr  # transformers' FutureWarning stays off the console
