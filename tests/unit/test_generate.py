"""Generation eval and `ftlaunch infer`: exact match, stopping at the end of the turn, left-padded
batches, the chat template applied at inference exactly as the jobs render it.

A real Qwen2-layout folder (`ftlaunch model make qwen2`), its eos set to `<|endoftext|>` as a
downloaded Qwen2's is (its chats end in `<|im_end|>`), and a model taught one answer.
"""

import json

import pytest
import torch

from common.chat import PLAIN_TEMPLATE
from jobs import generate as G
from jobs.text import render, tokenizer_for
from launcher.inference import RunModel, greedy, prompt_text, stop_token_ids, with_template
from launcher.spec import DataSpec, ModelSpec

QUESTION = [{"role": "user", "content": "what colour is the zorp?"}]
ANSWER = "The zorp is red."


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A qwen2 folder whose tokenizer's eos is not its end-of-turn token, and a model that learnt
    to answer QUESTION with ANSWER, then `<|im_end|>`, then more text (past the turn's end)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.modelmake import make_model

    folder = make_model("qwen2", tmp_path_factory.mktemp("q") / "q")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    text = render(tok, QUESTION + [{"role": "assistant", "content": ANSWER}]) + "the blick is blue the blick"
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"folder": folder, "tok": tok, "model": model.eval()}


def test_exact_match_normalises_whitespace_only():
    refs = ["The zorp is red.", "The osk is blue."]
    assert G.exact_match(["  The zorp\n is  red. ", "The osk is blue."], refs) == 1.0
    assert G.exact_match(["the zorp is red.", "The osk is blue"], refs) == 0.0  # case and punctuation count
    assert G.exact_match(["The zorp is red.", "The osk is green."], refs) == 0.5
    assert G.exact_match([], []) is None


def test_generation_stops_at_the_end_of_turn_token(qwen):
    tok, model = qwen["tok"], qwen["model"]
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    assert im_end != eos and stop_token_ids(tok) == sorted({im_end, eos})
    prompt = render(tok, QUESTION, add_generation_prompt=True)
    assert greedy(model, tok, [prompt], max_new_tokens=20) == [ANSWER]
    # The model goes on past its turn: without the end-of-turn stop the answer would run on.
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    run_on = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                            do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    assert tok.decode(run_on[0, ids.shape[1]:], skip_special_tokens=True).startswith(ANSWER + "\nthe blick")


def test_left_padded_batch_answers_as_one_prompt_alone(qwen):
    tok, model = qwen["tok"], qwen["model"]
    short = render(tok, QUESTION, add_generation_prompt=True)
    long = render(tok, [{"role": "system", "content": "a much longer system line " * 3}, *QUESTION],
                  add_generation_prompt=True)
    alone = greedy(model, tok, [long], max_new_tokens=12)
    assert greedy(model, tok, [long, short], max_new_tokens=12) == alone + [ANSWER]
    assert model.training is False


def test_eval_pairs_and_exact_match_of_a_split(qwen, tmp_path):
    rows = [{"messages": [*QUESTION, {"role": "assistant", "content": ANSWER}]},
            {"messages": [{"role": "system", "content": "be brief"}, *QUESTION,
                          {"role": "assistant", "content": "The zorp is blue."}]},
            {"messages": [*QUESTION]}]  # no assistant turn: not scored
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataSpec(task="chat", train=str(path), eval=str(path))
    pairs = G.eval_pairs(str(path), data, 10)
    assert [r for _, r in pairs] == [ANSWER, "The zorp is blue."]
    assert len(G.eval_pairs(str(path), data, 1)) == 1
    sharegpt = tmp_path / "sharegpt.jsonl"  # the last assistant turn is the reference, the turns before it the prompt
    sharegpt.write_text(json.dumps({"conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
        {"from": "human", "value": QUESTION[0]["content"]}, {"from": "gpt", "value": ANSWER}]}) + "\n")
    (prompt, reference), = G.eval_pairs(str(sharegpt), data, 10)
    assert reference == ANSWER and prompt[-1] == QUESTION[0] and [m["role"] for m in prompt] == [
        "user", "assistant", "user"]
    model_spec = ModelSpec(source=f"hf:{qwen['folder']}", seq_len=64)
    result = G.evaluate(qwen["model"], model_spec, data, pairs[:2])
    assert result == {"exact_match": 0.5}  # the model answers the first, not the second
    assert G.max_new_tokens(qwen["tok"], [ANSWER]) == len(qwen["tok"](ANSWER)["input_ids"]) + G.MARGIN


def _run_folder(tmp_path, qwen, task="chat") -> str:
    """A finetune run folder as the job leaves it: manifest, model/, tokenizer/."""
    run = tmp_path / "run-1"
    data = {"task": task, "train": str(tmp_path / "train.jsonl")}
    spec = {"kind": "finetune", "name": "chat-sft", "model": {"source": f"hf:{qwen['folder']}", "seq_len": 64},
            "strategy": {"type": "full"}, "data": data, "train": {"max_steps": 1}}
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"run_id": "run-1", "kind": "finetune", "spec": spec}))
    qwen["model"].save_pretrained(run / "model")
    tokenizer_for(ModelSpec(source=f"hf:{qwen['folder']}"), DataSpec(**data)).save_pretrained(run / "tokenizer")
    return str(run)


def test_infer_renders_the_input_with_the_runs_chat_template_and_answers(qwen, tmp_path, capsys):
    from launcher.cli.main import main

    run = RunModel(_run_folder(tmp_path, qwen))
    assert run.prompt(QUESTION[0]["content"]) == render(qwen["tok"], QUESTION, add_generation_prompt=True)
    assert run.generate([QUESTION[0]["content"]]) == [ANSWER]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(QUESTION[0]["content"] + "\n\n")
    assert main(["infer", str(run.run_dir), "--input", QUESTION[0]["content"], "--file", str(prompts)]) == 0
    assert capsys.readouterr().out == f"{ANSWER}\n{ANSWER}\n"
    assert main(["infer", str(run.run_dir), "--variant", "lora", "--input", "x"]) == 1
    assert "not a compare; drop --variant" in capsys.readouterr().err
    assert main(["infer", str(tmp_path / "nowhere"), "--input", "x"]) == 1
    assert "no run at" in capsys.readouterr().err


def test_an_instruction_prompt_is_rendered_as_the_jobs_render_it():
    """A tokenizer with no chat template (the byte-level one): the plain instruction template."""
    import copy

    from jobs.components import tokenizer

    data = DataSpec(task="instruction", train="x.jsonl")
    job_tok = tokenizer_for(ModelSpec(source="tiny-llama"), data)
    expected = render(job_tok, [{"role": "user", "content": "sort: 3 1"}], add_generation_prompt=True)
    assert expected == "### Instruction:\nsort: 3 1\n\n### Response:\n"
    bare = copy.deepcopy(tokenizer())
    bare.chat_template = None  # as a saved tokenizer without a template loads
    assert with_template(bare, data.model_dump()).chat_template == PLAIN_TEMPLATE
    assert prompt_text(bare, "sort: 3 1", "instruction") == expected
    assert prompt_text(bare, "count from 4:", "causal_lm") == "count from 4:"
