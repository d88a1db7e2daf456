"""configs/sft plan on the folders their `# data:` lines make; the plan's packing figure counts
tokens exactly as the model's own tokenizer and chat template do, in well under a second."""

import re
import shlex
import time
from pathlib import Path

import pytest

from launcher.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
SFT = sorted((ROOT / "configs" / "sft").glob("*.yaml"))


def test_the_three_sft_configs_are_shipped():
    assert [p.stem for p in SFT] == ["chat-lora", "full-deepspeed", "instruction-qlora-packed"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, made_model):
    """A folder where each sft config's `# data:` line has run (`model make` is the session's folder)."""
    root = tmp_path_factory.mktemp("sft")
    for spec in SFT:
        line = spec.read_text().splitlines()[1]
        assert line.startswith("# data: ftlaunch "), spec
        for command in line.removeprefix("# data: ").split(" && "):
            args = shlex.split(command)[1:]
            at = args.index("--out") + 1
            out = args[at] = str(root / args[at])
            if args[:2] == ["model", "make"]:
                assert args[2] == "qwen2"
                if not Path(out).exists():
                    made_model("qwen2", out)
            elif not Path(out).exists():
                assert main(args) == 0
    return root


@pytest.mark.parametrize("spec", SFT, ids=lambda p: p.stem)
def test_each_sft_config_plans_on_what_its_data_line_makes(spec, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert main(["plan", str(spec)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert re.search(r"^  verdict\s+fits$", out, re.M), out
    assert "data.eval " in out  # `data make chat|instruction` wrote the eval split too
    assert "cuts" not in out  # seq_len holds the rows: every answer is trained on
    assert f"model hf:{workdir / 'models/q'}," in out
    packed = re.search(r"^packing       padding (\d+)% unpacked -> (\d+)% packed", out, re.M)
    assert bool(packed) == ("packed" in spec.stem)
    if packed:
        assert int(packed.group(2)) < int(packed.group(1)) / 2, out


def test_a_short_seq_len_that_cuts_the_answers_is_warned(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert main(["plan", str(ROOT / "configs/sft/chat-lora.yaml"), "model.seq_len=32"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"warning       model.seq_len: 32 cuts 100% of 256 sampled train rows \(mean [\d.]+, longest "
                     r"(\d+) tokens\): the end of each \(its last answer, which the loss is on\) is not trained on; "
                     r"raise model.seq_len \(to \1 for all\)", out), out


def test_padding_figures():
    from launcher.padding import figures

    fig = figures([10, 30, 60, 100], 64)  # kept 10, 30, 60, 64: rows [10+30] [60] [64]
    assert fig["padding_unpacked"] == round(1 - 164 / 256, 4)
    assert fig["padding_packed"] == round(1 - 164 / 192, 4)
    assert (fig["truncated"], fig["max_tokens"], fig["rows_per_packed_row"]) == (0.25, 100, round(4 / 3, 2))


@pytest.mark.parametrize("task", ["chat", "instruction", "instruction-plain", "causal_lm"])
def test_the_token_counts_are_those_of_the_models_tokenizer_and_template(task, made_model, tmp_path):
    from transformers import AutoTokenizer

    from common.chat import PLAIN_TEMPLATE, to_messages
    from launcher import synthetic
    from launcher.datacheck import sample_rows
    from launcher.padding import lengths

    folder = made_model("qwen2", tmp_path / "q")
    if task == "instruction-plain":  # no chat template of its own: the plain instruction template
        (folder / "chat_template.jinja").unlink()
    name = {"causal_lm": "counting"}.get(task, task.split("-")[0])
    rows = sample_rows(synthetic.make(name, 300, tmp_path / "d", fmt="jsonl"), 256)
    task = task.split("-")[0]
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if task == "causal_lm":
        expected = [len(tok(r["text"])["input_ids"]) + 1 for r in rows]  # + the eos the job appends
    else:
        template = None if tok.chat_template else PLAIN_TEMPLATE
        texts = [tok.apply_chat_template(to_messages(r, task), tokenize=False, chat_template=template) for r in rows]
        expected = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert lengths({"source": f"hf:{folder}"}, {"task": task}, rows) == expected
    # the byte-level tokenizer of the random-init models: one id per byte
    assert lengths({"source": "tiny-llama"}, {"task": "causal_lm"}, rows[:3]) == [
        len(r.get("text", "").encode()) + 1 for r in rows[:3]]


def test_the_estimate_is_cheap(workdir):
    from launcher.jobplan import plan
    from launcher.padding import estimate
    from launcher.spec import load_spec

    spec = plan(load_spec(ROOT / "configs/sft/instruction-qlora-packed.yaml"), base_dir=str(workdir),
                preflight=False).spec
    estimate(spec)  # imports once
    start = time.perf_counter()
    fig, warnings = estimate(spec)
    assert time.perf_counter() - start < 1.0
    assert fig["sampled"] == 256 and warnings == []
