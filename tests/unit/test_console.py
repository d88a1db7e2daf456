"""What a followed job shows on the console (launcher/console.py), and the job's progress lines
(jobs/artifacts.py): ftlaunch's own lines, whole, named by variant, stage or task; Ray's and the
libraries' lines only with --verbose."""

from __future__ import annotations

import io
import json
import time

from jobs.artifacts import RunDir, progress_line
from launcher.console import Console, shown

# Captured from `make demo` (configs/demo.yaml on the embedded head), as the Jobs API log gave them.
RAY_AND_LIBRARY_NOISE = [
    "2026-12-02 04:22:40,627\tINFO job_manager.py:581 -- Runtime env is setting up.",
    "Running entrypoint for job demo-chat-20261202-042222: python -m jobs.run --plan-env FTLAUNCH_PLAN",
    "2026-12-02 04:22:44,804\tINFO worker.py:1691 -- Using address 127.0.0.1:53797 set in the environment "
    "variable RAY_ADDRESS",
    "2026-12-02 04:22:44,858\tINFO worker.py:2029 -- Connected to Ray cluster. View the dashboard at "
    "\x1b[1m\x1b[32mhttp://127.0.0.1:54945 \x1b[39m\x1b[22m",
    "\x1b[36m(TrainController pid=8669)\x1b[0m Requesting resources: {'CPU': 1.0} * 1",
    "\x1b[36m(RayTrainWorker pid=8928)\x1b[0m Setting up process group for: env:// [rank=0, world_size=1]",
    "\x1b[36m(TrainController pid=8669)\x1b[0m [2026-12-02 04:23:16,819 E 8669 8738] core_worker.cc:2465: Actor "
    "with class name: 'PreemptionWatcher' and ID: 'e263c64f21d631f67af30d2f02000000' has constructor arguments",
    "\x1b[36m(TrainController pid=8669)\x1b[0m - (ip=127.0.0.1, pid=8928) world_rank=0, local_rank=0, node_rank=0",
    "Loading weights: 100%|\u2588\u2588\u2588\u2588\u2588\u2588\u2588\u2588\u2588\u2588| 26/26 [00:00<00:00, "
    "6969.06it/s]",
    "\x1b[36m(RayTrainWorker pid=8928)\x1b[0m /work/main/.venv/lib/python3.11/site-packages/transformers/"
    "modeling_utils.py:3312: FutureWarning: `is_gradient_checkpointing` is deprecated and will be removed in v6. "
    "Use `is_activation_checkpointing` instead.",
    "\x1b[36m(RayTrainWorker pid=8928)\x1b[0m   warnings.warn(",
    "\x1b[36m(DatasetManager pid=9018)\x1b[0m /work/main/.venv/lib/python3.11/site-packages/ray/data/_internal/"
    "execution/interfaces/execution_options.py:436: RayDeprecationWarning: `ExecutionOptions.exclude_resources` "
    "is deprecated and will be removed after January 2027.",
    "\x1b[36m(SplitCoordinator pid=9366)\x1b[0m \u2714\ufe0f  Dataset train_0357Ve4SN3V7LWxilLFMfN_0 execution "
    "finished in 26.97 seconds",
    "[2026-12-02 04:22:02,451] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. "
    "If you have GPU or other accelerator, we were unable to detect it.",
]
OURS = [
    "[ftlaunch] run demo-chat-20261202-042222 (finetune) -> /work/wt-demo/runs/demo-chat-20261202-042222",
    "[ftlaunch] step 50/300 loss 5.6328 eval 5.4697 tok/s 1489 eta 128s",
    "[ftlaunch] FAILED: RuntimeError: worker died",
    "ftlaunch: error: data.train: missing.parquet does not exist",
]
SUMMARY_JSON = '[ftlaunch] summary {"wall_time_s": 87.63, "steps": 300, "strategy": "lora"}'


def test_only_ftlaunch_lines_reach_the_console_and_verbose_shows_every_line():
    log = "".join(line + "\n" for line in [*RAY_AND_LIBRARY_NOISE[:5], OURS[0], *RAY_AND_LIBRARY_NOISE[5:],
                                           *OURS[1:], SUMMARY_JSON])
    quiet, verbose = io.StringIO(), io.StringIO()
    for console in (Console(out=quiet), Console(verbose=True, out=verbose)):
        for i in range(0, len(log), 37):  # the Jobs API hands the log over in arbitrary pieces
            console.write(log[i:i + 37])
        console.close()
    assert quiet.getvalue() == "".join(line + "\n" for line in OURS)  # the raw summary JSON is for machines
    assert verbose.getvalue() == log


def test_a_worker_line_of_ours_loses_rays_prefix_and_a_last_line_without_newline_is_kept():
    assert shown("\x1b[36m(RayTrainWorker pid=8928, ip=10.0.0.2)\x1b[0m [ftlaunch] rank 1 ready") == (
        "[ftlaunch] rank 1 ready")
    assert all(shown(line) is None for line in RAY_AND_LIBRARY_NOISE)
    out = io.StringIO()
    console = Console(out=out)
    console.write("[ftlaunch] step 10/20 loss 1.0000 eta 3s")
    assert out.getvalue() == ""  # not a whole line yet
    console.close()
    assert out.getvalue() == "[ftlaunch] step 10/20 loss 1.0000 eta 3s\n"


def test_progress_lines_name_the_variant_stage_or_task():
    r = {"step": 50, "loss": 5.63281, "eval_loss": 5.46971, "tokens_per_s": 1489.2, "elapsed_s": 10.0}
    assert progress_line(r, 100) == "[ftlaunch] step 50/100 loss 5.6328 eval 5.4697 tok/s 1489 eta 10s"
    assert progress_line(r, 100, "variant lora_r8").startswith("[ftlaunch] variant lora_r8: step 50/100 loss")
    assert progress_line({**r, "stage": "vision"}, 100).startswith("[ftlaunch] stage vision: step 50/100")
    # The ARR-COC pipeline counts rows: its progress says so (it said tok/s).
    assert progress_line({**r, "stage": "vision"}, 100, unit="rows/s").endswith("rows/s 1489 eta 10s")
    task = {"task": "counting", "step": 5, "loss": 1.5, "elapsed_s": 1.0}  # a multitask record: no tokens/s
    assert progress_line(task, 10) == "[ftlaunch] task counting: step 5/10 loss 1.5000 eta 1s"


def test_progress_follows_every_tasks_metrics_file(tmp_path, capsys):
    run = RunDir(str(tmp_path / "run"))
    with run.progress({"metrics-a.jsonl": 4, "metrics-b.jsonl": 2}, every=0.05):
        for name, step in (("a", 2), ("b", 2), ("a", 4)):
            with open(run.path / f"metrics-{name}.jsonl", "a") as f:
                f.write(json.dumps({"task": name, "step": step, "loss": 1.0, "elapsed_s": 1.0}) + "\n")
            time.sleep(0.15)
    assert capsys.readouterr().out.splitlines() == [
        "[ftlaunch] task a: step 2/4 loss 1.0000 eta 1s",
        "[ftlaunch] task b: step 2/2 loss 1.0000 eta 0s",
        "[ftlaunch] task a: step 4/4 loss 1.0000 eta 0s",
    ]
