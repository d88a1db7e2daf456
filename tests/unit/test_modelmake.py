"""`ftlaunch model make` writes what a downloaded model folder holds, loadable by the Auto classes."""

import pytest

from launcher.modelmake import FAMILIES, make_model

FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
         "tokenizer_config.json", "chat_template.jinja"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_made_folder_loads_like_a_downloaded_one(family, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_model(family, tmp_path / family)
    assert FILES <= {f.name for f in folder.iterdir()}
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert model.config.model_type == family
    assert len(tok) <= model.config.vocab_size  # every token id has an embedding row
    assert tok.pad_token and tok.eos_token_id == model.config.eos_token_id
    chat = [{"role": "user", "content": "count from 41: 41"}, {"role": "assistant", "content": "42 43"}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert "count from 41: 41" in text and "42 43" in text and text != "count from 41: 41 42 43"
    # A trained vocabulary: a task word is one token, not its bytes.
    assert len(tok("count", add_special_tokens=False)["input_ids"]) == 1
    # tokenizer.json alone (the `tokenizers` library: the plan's token counts) tokenizes as transformers
    # does, Qwen2's digit split included.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    sample = "add one to: 26 32 46\nThe zorp is red. " + text
    assert raw.encode(sample, add_special_tokens=False).ids == tok(sample, add_special_tokens=False)["input_ids"]
    again = make_model(family, tmp_path / f"{family}-again")
    same = AutoModelForCausalLM.from_pretrained(again, local_files_only=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), name  # seeded: the same folder twice


def test_an_unknown_family_is_one_line():
    from launcher.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown; use one of: qwen2, llama, mistral"):
        make_model("gpt-7", "/tmp/never")
