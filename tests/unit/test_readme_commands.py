"""Every fenced `ftlaunch ...` line of the README is exercised, in the README's order, in a scratch
folder holding the repository's configs/ and k8s/: run for real when it needs no cluster and no
training (data, model, validate, plan, render, validate-k8s, claims), planned when it submits
(`submit SPEC ...` -> `plan SPEC ...` with the same spec, overrides, target and profile), and
parsed by the real CLI parser otherwise (it needs a head or a finished run: integration tests run
those verbs). The README cannot drift from the CLI without this test failing."""

from __future__ import annotations

import glob
import shlex

import pytest

from launcher.cli.main import main, parser
from tests.conftest import ROOT
from tests.readme import command_lines

RUN = {"data", "model", "validate", "plan", "render", "validate-k8s", "claims"}
PLANNED = {"submit"}
COMMANDS = command_lines("ftlaunch")


def argv_of(line: str) -> list[str]:
    """The line's arguments as a shell would pass them (its comment dropped, globs expanded)."""
    words = shlex.split(line, comments=True)[1:]
    return [m for w in words for m in (sorted(glob.glob(w)) or [w] if "*" in w else [w])]


def planned(argv: list[str]) -> list[str]:
    """`submit SPEC ...` as the `plan` of the same spec, overrides, target and profile."""
    args, extra = parser().parse_known_args(argv)
    out = ["plan", args.spec, *args.overrides, *extra, "--target", args.target]
    return out + (["--profile", args.profile] if args.profile else [])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder like a fresh clone's root: configs/ and k8s/ of the repository, nothing made yet."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("configs", "k8s"):
        (root / name).symlink_to(ROOT / name)
    return root


def test_the_readme_has_ftlaunch_commands_of_every_kind():
    verbs = {argv_of(line)[0] for line in COMMANDS}
    assert {"data", "plan", "submit", "status"} <= verbs, COMMANDS


@pytest.mark.parametrize("line", COMMANDS, ids=range(len(COMMANDS)))
def test_readme_command(line, scratch, monkeypatch, capsys):
    monkeypatch.chdir(scratch)
    monkeypatch.setenv("FTLAUNCH_HOME", str(scratch / ".ftlaunch"))  # no head of the user's is touched
    argv = argv_of(line)
    if argv[0] in RUN | PLANNED:
        rc = main(planned(argv) if argv[0] in PLANNED else argv)
        out, err = capsys.readouterr()
        assert rc == 0, f"{line}\n{out[-2000:]}\n{err[-2000:]}"
        return
    args, extra = parser().parse_known_args(argv)  # a bad flag or a missing argument exits here
    assert all("=" in e and hasattr(args, "overrides") for e in extra), (line, extra)


def test_every_test_the_failure_modes_table_names_exists():
    """The README's "Failure modes" table names the test of each fault: each file exists, and
    each `file::name` is a test function in it (the table cannot point at a renamed test)."""
    import re

    from tests.readme import README

    text = README.read_text()
    table = text[text.index("### Failure modes"):text.index("### Details")]
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", table)
    assert len(named) >= 12, named
    root = README.parent
    for path, name in named:
        source = (root / path).read_text()
        assert not name or f"def {name}(" in source, f"{path}::{name} is not a test there"
