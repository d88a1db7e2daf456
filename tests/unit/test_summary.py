"""The end-of-run summary a finetune prints: what the job measured, in the units common/units writes."""

from launcher.summary import format_summary


def test_finetune_summary_shows_exact_match_padding_and_sizes():
    manifest = {"kind": "finetune", "run_id": "r1", "spec": {"data": {"task": "chat", "packing": True}},
                "summary": {"steps": 300, "strategy": "lora", "loss_first": 5.6, "loss_last": 5.2,
                            "eval_loss_before": 6.5, "eval_loss_after": 5.2,
                            "eval_exact_match_before": 0.0, "eval_exact_match_after": 0.953125,
                            "padding_fraction": 0.0912, "export": "adapter", "export_bytes": 141394,
                            "trainable_params": 32768, "total_params": 148032, "wall_time_s": 53.8}}
    text = format_summary(manifest)
    assert "exact match    0.0% -> 95.3% (greedy answers to the eval prompts)" in text
    assert "padding        9.1% of the tokens trained (packed)" in text
    assert "adapter        138.1 KiB" in text
    assert "32,768 trainable / 148,032 total (22.14%)" in text
