"""`ftlaunch report`: synthetic run folders shaped as the jobs write them, read back as a report.

Each folder holds what jobs/run.py and the kind's job module write: manifest.json (spec, plan
without its estimate, status, summary), the metrics JSONL files and the kind's own records.
"""

import json
import re
from pathlib import Path

import matplotlib.image

from common.runfolder import median_throughput
from launcher.cli.main import main
from launcher.jobplan import plan
from launcher.report import loss_facts, write_report
from launcher.spec import load_spec
from tests.conftest import ROOT


def make_run(tmp_path: Path, config: str, status: str, **fields) -> Path:
    """A run folder with the manifest jobs/run.py writes for `config` (the plan as the job gets it)."""
    p = plan(load_spec(ROOT / config), "local", preflight=False, base_dir=str(tmp_path),
             submission_id=f"{Path(config).stem}-run").to_dict()
    run = Path(p["run_dir"])
    run.mkdir(parents=True)
    manifest = {"attempts": [{"submission_id": p["run_id"], "started": 100.0}], "run_id": p["run_id"],
                "kind": p["kind"], "name": p["name"], "status": status, "started": 100.0,
                "spec": p["spec"], "plan": {k: v for k, v in p.items() if k != "spec"}, **fields}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def write_jsonl(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def finetune_metrics(losses, evals, retain=None):  # jobs/finetune.py's records
    out = [{"step": 20 * (i + 1), "loss": loss, "lr": 0.003, "tokens": 26000 * (i + 1),
            "tokens_per_s": 30000.0 + i, "elapsed_s": 15.0 + i, "time": 1000.0 + i, "eval_loss": ev}
           for i, (loss, ev) in enumerate(zip(losses, evals))]
    if retain is not None:
        out[-1]["retain_loss"] = retain
    return out


def check_report(run: Path, headings: list[str]) -> str:
    """The md and html exist, every heading is there, every referenced PNG is a real image."""
    paths = write_report(str(run))
    md, page = run / "report" / "report.md", run / "report" / "report.html"
    assert paths[:2] == [md, page]
    text = md.read_text()
    for heading in headings:
        assert f"\n{heading}\n" in f"\n{text}", heading
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert images and sorted(run / "report" / i for i in images) == sorted(paths[2:])
    for name in images:
        png = run / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        h, w, _ = matplotlib.image.imread(png).shape
        assert 300 <= h <= 800 and 600 <= w <= 1500, (name, h, w)
    html = page.read_text()
    assert html.count("data:image/png;base64,") == len(images)  # self-contained
    for heading in headings:
        assert f">{heading.lstrip('# ')}</h" in html
    return text


def test_finetune_report_has_curves_memory_and_the_recorded_numbers(tmp_path):
    from common.units import size as _size
    from launcher.planner import estimate

    summary = {"wall_time_s": 41.8, "steps": 120, "strategy": "lora", "loss_first": 5.184, "loss_last": 4.66,
               "eval_loss_before": 5.5697, "eval_loss_after": 4.6072, "retain_loss_before": 5.5161,
               "retain_loss_after": 5.2363, "trainable_params": 17408, "total_params": 132800,
               "rss_start_mb": 389.3, "peak_rss_mb": 674.0, "export": "adapter", "export_bytes": 79863}
    run = make_run(tmp_path, "configs/tiny/lora.yaml", "SUCCEEDED", finished=145.5, summary=summary,
                   before={"eval_loss_before": 5.5697, "retain_loss_before": 5.5161})
    write_jsonl(run / "metrics.jsonl", finetune_metrics([5.184, 4.9679, 4.66], [5.0367, 4.9239, 4.6072], 5.2363))
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 2048)

    text = check_report(run, ["# Run report: tiny-lora", "## Spec", "## Plan warnings", "## Artifacts",
                              "## Memory per worker: planned vs measured", "## train"])
    assert "- run id: lora-run\n- kind: finetune\n- status: SUCCEEDED" in text
    assert "- wall time: 41.8 s training, 45.5 s from start to end" in text
    assert "- strategy: lora, r 8, alpha 16.0, dropout 0.0, target_modules all-linear" in text
    assert "- adapter/: 1 files, 2.0 KiB" in text
    assert "- train loss 5.1840 -> 4.6600 (steps 20 -> 60, 3 records)" in text
    assert "- eval loss 5.5697 -> 4.6072 (before training -> last)" in text
    assert "- retain loss 5.5161 -> 5.2363 (before training -> last)" in text
    assert "- throughput median 30,001 tokens/s, last 30,002 tokens/s" in text
    planned = estimate(json.loads((run / "manifest.json").read_text())["spec"], "local-cpu")["memory"]["total"]
    assert f"- train: planned {_size(planned)}; measured peak RSS 674 MiB (+285 MiB over the worker's start)" in text
    for png in ("loss-train.png", "eval-train.png", "throughput-train.png", "memory.png"):
        assert f"]({png})" in text


def test_failed_pipeline_reports_each_stage_and_the_error(tmp_path):
    error = "RuntimeError: worker died"
    run = make_run(tmp_path, "configs/arrcoc/mini.yaml", "FAILED", finished=300.0, error=error)
    stage = {"texture": (60, [2.5, 2.0, 1.75]), "lora": (150, [1.5, 1.25])}
    records = []
    for name, (steps, losses) in stage.items():  # jobs/pipeline.py's records
        for i, loss in enumerate(losses):
            records.append({"stage": name, "step": 20 * (i + 1), "loss": loss, "tokens_per_s": 40.0 + i,
                            "elapsed_s": 2.0 * i, "time": 200.0 + i})
    records[2].update(accuracy=0.5, digests={"texture": "ab"}, trainable_params=4096, total_params=90000)
    write_jsonl(run / "metrics.jsonl", records)
    (run / "pipeline.json").write_text(json.dumps({"run_id": "mini-run", "stages": [
        {"name": "texture", "status": "SUCCEEDED", "checkpoint": "stages/texture/state.pt", "attempts": 1,
         "steps": 60, "accuracy_before": 0.25, "accuracy_after": 0.5, "loss_first": 2.75, "loss_last": 1.75,
         "trainable_params": 4096, "total_params": 90000},
        {"name": "lora", "status": "FAILED", "checkpoint": None, "attempts": 1, "error": error},
        {"name": "end-to-end", "status": "PENDING", "checkpoint": None}]}))

    text = check_report(run, ["## stage texture", "## stage lora", "## stage end-to-end"])
    assert f"- status: FAILED\n- error: {error}" in text
    texture, lora, e2e = text.split("## stage ")[1:]
    assert "- train loss 2.5000 -> 1.7500 (steps 20 -> 60, 3 records)" in texture
    assert "- eval accuracy 25.0% -> 50.0%" in texture
    assert "- throughput median 41 rows/s" in texture
    assert f"- status: FAILED\n- error: {error}\n- train loss 1.5000 -> 1.2500" in lora
    assert "- status: PENDING" in e2e and "No metrics recorded." in e2e and ".png" not in e2e
    assert "measured: not recorded" in text
    assert (run / "report" / "eval-texture.png").is_file() and not (run / "report" / "eval-lora.png").exists()


def test_multitask_report_has_a_section_per_task_with_its_eval(tmp_path):
    tasks = {"counting": (5.5575, 4.8195), "alphabet": (5.5119, 4.6692)}
    recorded = {n: {"status": "SUCCEEDED", "steps": 60, "wall_time_s": 15.0,
                    "eval": {"eval_loss_before": b, "eval_loss": a, "loss_first": 5.56, "loss_last": 4.8}}
                for n, (b, a) in tasks.items()}
    recorded["instruction"] = {"status": "FAILED", "error": "ValueError: the train split yields no full micro-batch"}
    run = make_run(tmp_path, "configs/multitask/three-tasks.yaml", "FAILED", tasks=recorded, error="RuntimeError: 1 of 3 tasks failed")
    for name in tasks:  # jobs/multitask.py's records
        write_jsonl(run / f"metrics-{name}.jsonl", [
            {"task": name, "step": s, "loss": loss, "elapsed_s": 1.0 * s, "time": 10.0 + s}
            for s, loss in ((20, 5.125), (40, 4.9375), (60, 4.875))])

    text = check_report(run, ["## task counting", "## task alphabet", "## task instruction"])
    counting, alphabet, instruction = text.split("## task ")[1:]
    assert "- train loss 5.1250 -> 4.8750 (steps 20 -> 60, 3 records)" in counting
    assert "- eval loss 5.5575 -> 4.8195" in counting and "- eval loss 5.5119 -> 4.6692" in alphabet
    assert "- error: ValueError: the train split yields no full micro-batch" in instruction
    assert "- task alphabet: causal_lm on" in text and "; lora.r 4" in text
    assert "- resources: 3 workers x 0.4 CPU" in text
    # The eval loss (before, after) is drawn in the loss figure; no throughput was recorded.
    assert "](loss-counting.png)" in counting and "eval-" not in text and "throughput-" not in text


def test_stopped_compare_report_has_a_section_per_variant(tmp_path, made_model):
    made_model("qwen2", tmp_path / "models" / "q")  # the compare config's model (`ftlaunch model make qwen2`)
    run = make_run(tmp_path, "configs/compare.yaml", "STOPPED", error="Stopped: stopped by request (SIGTERM)")
    losses = {"deepspeed_full": [5.0, 4.0, 3.5], "lora_r8": [5.25, 4.75]}
    for name, ls in losses.items():  # each variant is a finetune in variants/<name>
        folder = run / "variants" / name
        write_jsonl(folder / "metrics.jsonl", finetune_metrics(ls, [x + 0.25 for x in ls]))
        (folder / "manifest.json").write_text(json.dumps({"before": {"eval_loss_before": 5.75}}))
    summary = {"loss_first": 5.0, "loss_last": 3.5, "eval_loss_before": 5.75, "eval_loss_after": 3.75,
               "eval_accuracy_before": 0.125, "eval_accuracy_after": 0.875, "peak_rss_mb": 700.0, "rss_start_mb": 400.0,
               "eval_exact_match_before": 0.0, "eval_exact_match_after": 0.8125}
    write_jsonl(run / "variants.jsonl", [{"variant": "deepspeed_full", **summary, "strategy": "full",
                                         "engine": "deepspeed ZeRO-2", "tokens_per_s": 3000.0}])

    text = check_report(run, ["## variant deepspeed_full", "## variant lora_r8", "## variant lora_r32",
                              "## variant qlora_r8"])
    assert "- status: STOPPED\n- error: Stopped: stopped by request (SIGTERM)" in text
    full, r8, r32, _ = text.split("## variant ")[1:]
    assert "- status: SUCCEEDED\n- full, engine deepspeed ZeRO-2" in full
    assert "- eval accuracy 12.5% -> 87.5%" in full
    assert "- eval exact match 0.0% -> 81.2% (before training -> last)" in full
    assert "exact match" not in r8  # measured for instruction and chat runs only
    assert "- status: STOPPED" in r8 and "- train loss 5.2500 -> 4.7500" in r8
    assert "- eval loss 5.7500 -> 5.0000" in r8  # the last recorded eval of a stopped variant
    assert "- status: not started" in r32 and "No metrics recorded." in r32
    assert "- deepspeed_full: planned " in text and "measured peak RSS 700 MiB (+300 MiB" in text
    assert "- lora_r8: planned " in text and "; measured: not recorded" in text
    # The comparison: a table row per finished variant (what the job and `ftlaunch report` both draw).
    table = text.split("## Strategies compared")[1]
    assert "| variant | strategy | engine | trainable |" in table
    assert "| deepspeed_full | full | deepspeed ZeRO-2 |" in table and "| lora_r8 |" not in table
    assert "<table>" in (run / "report" / "report.html").read_text()


def test_cli_prints_the_paths_and_refuses_a_missing_run(tmp_path, capsys):
    run = make_run(tmp_path, "configs/tiny/lora.yaml", "RUNNING")
    assert main(["report", run.name, "--storage", str(run.parent)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[:2] == [str(run / "report" / "report.md"), str(run / "report" / "report.html")]
    assert "No metrics recorded." in (run / "report" / "report.md").read_text()

    assert main(["report", "nonexistent", "--storage", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"ftlaunch: error: no run at {tmp_path / 'nonexistent'} (no manifest.json); pass the run folder, a run id "
        f"or a submission id under --storage (now {tmp_path})")


def test_throughput_is_the_median_of_report_windows_in_the_table_and_the_report():
    # The first window holds the start-up (slow); the mean over elapsed time would count it fully.
    metrics = [{"step": 10 * i, "loss": 1.0, "tokens_per_s": r} for i, r in enumerate([50.0, 400.0, 390.0, 410.0])]
    assert median_throughput(metrics) == 400.0
    assert median_throughput([{"step": 1}]) is None
    assert "throughput median 400 tokens/s, last 410 tokens/s" in loss_facts(metrics)
