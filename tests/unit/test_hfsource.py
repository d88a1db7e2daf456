"""`hf:<org>/<name>[@<revision>]` resolves offline from the local Hugging Face cache, in the layout
huggingface_hub writes (blobs, symlinked snapshots, refs); the plan records the snapshot folder; a
hub id the cache does not hold is one line at plan, naming the cache and the fix."""

import hashlib
import json
import shutil

import pytest
import yaml

from common import hfsource
from launcher.cli.main import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def hub_cache(cache, repo, folder, commit=COMMIT, refs=("main",)):
    """What `hf download <repo>` leaves: each file a blob named by its hash, the snapshot of a
    commit made of symlinks to them, and refs/<branch> holding the commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, root / "blobs" / digest)
        (snap / f.name).symlink_to(f"../../blobs/{digest}")
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def cache(tmp_path, made_model, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    hub_cache(root, "acme/tiny-qwen", made_model("qwen2"))
    hub_cache(root, "acme/tiny-qwen", made_model("qwen2"), commit=OTHER, refs=("v1", "pr/2"))
    return root


def test_a_hub_id_is_its_snapshot_at_main_a_branch_a_nested_ref_or_a_commit(cache):
    snaps = cache / "models--acme--tiny-qwen" / "snapshots"
    assert hfsource.resolve("acme/tiny-qwen") == str(snaps / COMMIT)
    assert hfsource.resolve("acme/tiny-qwen@v1") == str(snaps / OTHER)
    assert hfsource.resolve("acme/tiny-qwen@pr/2") == str(snaps / OTHER)
    assert hfsource.resolve(f"acme/tiny-qwen@{OTHER}") == str(snaps / OTHER)
    with pytest.raises(hfsource.NotInCache, match="acme/tiny-qwen at revision v9 is not in"):
        hfsource.resolve("acme/tiny-qwen@v9")
    with pytest.raises(hfsource.NotInCache):
        hfsource.resolve("acme/tiny-qwen@" + "9" * 40)  # a commit the cache has no snapshot of


def test_the_cache_folder_follows_huggingface_hubs_order(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hfsource.cache_dir() == (str(tmp_path / "home/.cache/huggingface/hub"), "default")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hfsource.cache_dir()[0] == str(tmp_path / "xdg/huggingface/hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hfsource.cache_dir() == (str(tmp_path / "hfhome/hub"), "HF_HOME")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "explicit"))
    assert hfsource.cache_dir() == (str(tmp_path / "explicit"), "HF_HUB_CACHE")
    from huggingface_hub import constants  # the library's own reading of the same settings

    assert constants.HF_HUB_CACHE  # (read at its import; the order above is its documented one)


def test_a_folder_that_looks_like_a_hub_id_stays_a_folder(cache, tmp_path, made_model):
    made_model("qwen2", tmp_path / "acme" / "tiny-qwen")
    assert hfsource.resolve("acme/tiny-qwen", lambda p: str(tmp_path / p)) == str(tmp_path / "acme/tiny-qwen")
    assert hfsource.repo_id("./models/q") is None and hfsource.repo_id("/abs/q") is None
    assert hfsource.repo_id("a/b/c") is None and hfsource.repo_id("../x") is None


def spec_file(tmp_path, source, **data):
    from launcher.synthetic import make

    make("chat", 600, tmp_path / "data", fmt="jsonl")
    spec = {"kind": "finetune", "name": "hub", "model": {"source": source, "seq_len": 64},
            "strategy": {"type": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
            "data": {"task": "chat", "train": "data/train.jsonl", **data},
            "train": {"max_steps": 5, "micro_batch": 4}, "resources": {"workers": 1, "cpus_per_worker": 1}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_plan_records_the_snapshot_folder_and_the_job_loads_its_tokenizer(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", str(spec_file(tmp_path, "hf:acme/tiny-qwen@v1")), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    snapshot = cache / "models--acme--tiny-qwen" / "snapshots" / OTHER
    assert planned["spec"]["model"]["source"] == f"hf:{snapshot}"
    from transformers import AutoTokenizer

    from jobs.text import model_folder

    assert model_folder({"source": "hf:acme/tiny-qwen@v1"}) == str(snapshot)  # the cluster side agrees
    tok = AutoTokenizer.from_pretrained(model_folder(planned["spec"]["model"]), local_files_only=True)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"  # read through the blob symlinks


def test_a_hub_id_not_in_the_cache_is_one_line_naming_the_cache_and_the_fix(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = spec_file(tmp_path, "hf:acme/missing")
    assert main(["plan", str(spec)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert (f"model.source: hf:acme/missing is no folder and acme/missing is not in the Hugging Face cache {cache} "
            "(from HF_HUB_CACHE); on a connected machine run `hf download acme/missing`") in err
    assert "or use hf:<model folder>" in err
    # For a remote cluster it may live there: the model check warns (the estimate still needs its config).
    from launcher.preflight import check_model

    warned = check_model([{"source": f"hf:{tmp_path}/acme/missing"}], "ray", written=[{"source": "hf:acme/missing"}])
    assert warned == [f"model.source: {tmp_path}/acme/missing is not visible here nor in this machine's Hugging "
                      "Face cache; not checked before submit"]
