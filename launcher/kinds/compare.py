"""`kind: compare`: a base finetune and variants that override it, run in turn by jobs/compare.py
on the same data, steps and evaluation, and reported side by side.

Each variant is validated as a finetune (its refusals included), so a compare runs only what
kind finetune runs; what is the compare's own (its folder, environment, wait) is refused per variant.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from launcher.errors import ConfigError
from launcher.kinds import register_kind, resolve_data, resolve_model
from launcher.kinds.finetune import FINETUNE, Finetune, FinetuneSpec

# Keys of the whole compare job: one folder, one environment, one wait for resources.
JOB_KEYS = {"name": "a variant is named by its key",
            "storage": "every variant writes under the compare's run folder",
            "env": "every variant runs in the compare job's environment",
            "pending_timeout": "the compare job waits for resources once, for all variants",
            "keep_checkpoints": "the compare job removes its variants' checkpoints when all have run"}


class CompareSpec(FinetuneSpec):
    """`kind: compare`: a base finetune (every field of one) and variants that override it.

    Every variant runs on the same data, steps and evaluation; a variant's `strategy` replaces the
    base's, every other key merges into it (e.g. `{engine: deepspeed, deepspeed: {zero_stage: 2}}`).
    """

    kind: Literal["compare"]
    variants: dict[str, dict[str, Any]] = Field(min_length=1, description="name -> overrides of the base")

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict) -> dict:
        bad = [n for n in value if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,30}", n)]
        if bad:
            raise ValueError(f"variant name {bad[0]!r}: use lower-case letters, digits, '-' and '_'")
        return value

    @model_validator(mode="after")
    def _variants_run(self) -> "CompareSpec":
        self.variant_specs()  # every variant must be a valid finetune: all problems at once
        return self

    def variant_specs(self) -> dict[str, dict]:
        return expand_variants(self.model_dump(mode="json"))


def expand_variants(spec: dict) -> dict[str, dict]:
    """Each variant of a compare spec dict as a validated finetune spec dict (ConfigError if not)."""
    from launcher.dsconfig import problems
    from launcher.spec import validate

    base = {k: v for k, v in spec.items() if k not in ("kind", "variants")}
    out, errors = {}, []
    for name, overrides in spec["variants"].items():
        merged = _merge(copy.deepcopy(base), {k: v for k, v in overrides.items() if k != "strategy"})
        if "strategy" in overrides:
            merged["strategy"] = copy.deepcopy(overrides["strategy"])
        merged.update(kind="finetune", name=f"{spec['name']}-{name}".replace("_", "-")[:40].strip("-"))
        try:
            variant = validate(merged).model_dump(mode="json")
        except ConfigError as exc:
            errors += [f"variants.{name}: {p}" for p in exc.problems]
            continue
        errors += [f"variants.{name}: {p}" for p in problems(variant)]
        out[name] = variant
    if errors:
        raise ConfigError(errors)
    return out


def _merge(into: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


class Compare(Finetune):
    """The base is planned, checked and estimated as the finetune it is; the job runs the variants."""

    name = "compare"
    model = CompareSpec

    def job_module(self, spec: dict) -> str:
        return "jobs.compare"

    def refusals(self, spec) -> list[str]:
        return [f"variants.{name}.{key}: {why}; set {key} at the top level" if key != "name" else
                f"variants.{name}.name: {why}; remove it"
                for name, overrides in spec.variants.items() for key, why in JOB_KEYS.items() if key in overrides]

    def models(self, spec: dict) -> dict[str, dict]:
        return {**super().models(spec), **{f"variants.{n}.model": v["model"] for n, v in spec["variants"].items()
                                           if isinstance(v.get("model"), dict)}}

    def resolve_paths(self, spec: dict, resolve) -> None:
        super().resolve_paths(spec, resolve)
        for overrides in spec["variants"].values():  # a variant's own data or model folder
            if isinstance(overrides.get("data"), dict):
                resolve_data(overrides["data"], resolve)
            if isinstance(overrides.get("model"), dict):
                resolve_model(overrides["model"], resolve)

    def prepare(self, spec: dict) -> tuple[Optional[dict], list[str]]:
        from launcher.dsconfig import prepare

        return prepare(spec), []

    def summary(self, manifest: dict, s: dict) -> str:
        """One line per variant, and where its report is."""
        from common.units import metric as _f

        lines = [f"run            {manifest.get('run_id')}"]
        for name, v in (s.get("variants") or {}).items():
            quality = f", {v['quality_vs_full']:.1f}% of full" if v.get("quality_vs_full") is not None else ""
            acc = f", accuracy {v['eval_accuracy_after']:.3f}" if v.get("eval_accuracy_after") is not None else ""
            if v.get("eval_exact_match_after") is not None:
                acc += (f", exact match {_f(v.get('eval_exact_match_before'))} -> "
                        f"{v['eval_exact_match_after']:.3f}")
            lines.append(f"{name:<14} {v.get('strategy')}: {v.get('trainable_params') or 0:,} trainable, "
                         f"eval loss {_f(v.get('eval_loss_before'))} -> {_f(v.get('eval_loss_after'))}"
                         f"{acc}{quality}")
        lines.append(f"report         {manifest.get('plan', {}).get('run_dir', '?')}/{s.get('report')}")
        return "\n".join(lines)

    report_on_finish = True  # the comparison is the point of the run: its report is written at the end

    def report_blocks(self, run_dir: Path, manifest: dict, out: Path) -> list:
        """The comparison table (every variant that finished) and its figure."""
        from launcher import figures
        from launcher.report import read_jsonl

        done = {r["variant"]: r for r in read_jsonl(run_dir / "variants.jsonl")}
        if not done:
            return [("h2", "Strategies compared"), ("p", "No variant finished yet.")]
        quality_vs_full(done)
        # Exact match exists for instruction and chat tasks only: its columns are left out elsewhere.
        columns = [c for c in COLUMNS if not c[0].startswith(("eval_exact_match", "eval_accuracy", "forgetting",
                                                                "quality")) or any(r.get(c[0]) is not None
                                                                                   for r in done.values())]
        rows = [[name] + [fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in columns]
                for name, r in done.items()]
        blocks = [("h2", "Strategies compared"), ("p", COMPARE_NOTE),
                  ("table", ["variant"] + [h for _, h, _ in columns], rows)]
        chart = figures.comparison(done, out)
        return blocks + ([("img", chart.name, "comparison")] if chart else [])

    def sections(self, run_dir: Path, manifest: dict) -> list:
        from launcher.report import finetune_section, read_jsonl

        done = {r["variant"]: r for r in read_jsonl(run_dir / "variants.jsonl")}
        names = list((manifest.get("spec") or {}).get("variants") or {})
        names += [p.name for p in sorted((run_dir / "variants").glob("*")) if p.is_dir() and p.name not in names]
        out = []
        for name in names:
            folder = run_dir / "variants" / name
            status = "SUCCEEDED" if name in done else manifest.get("status") if folder.is_dir() else "not started"
            s = finetune_section(f"variant {name}", name, folder, done.get(name, {}), status)
            if name in done:
                s.facts.insert(0, f"{done[name].get('strategy')}, engine {done[name].get('engine')}")
            out.append(s)
        return out

    def spec_lines(self, spec: dict) -> list[str]:
        import json

        return [f"variant {name}: {json.dumps(v) if v else 'the base spec'}"
                for name, v in (spec.get("variants") or {}).items()]

    def planned_memory(self, manifest: dict, profile: Optional[str]) -> dict:
        """Each variant's own estimate, its engine's defaults filled as the job fills them."""
        from launcher.dsconfig import prepare

        variants = expand_variants(manifest.get("spec") or {})
        for v in variants.values():
            prepare(v)
        return {n: FINETUNE.estimate(v, profile, strict=False)[0]["memory"]["total"] for n, v in variants.items()}


COMPARE_NOTE = ("Same data, steps, evaluation and seed for every variant. Quality % of full: eval accuracy "
                "(classification), exact match (instruction, chat: greedy answers to the eval prompts equal to "
                "the reference) or eval-loss gain (language modelling) relative to the full fine-tuning variant. "
                "Tokens/s: trained (non-pad) tokens per second of the variant's whole run. Peak RSS: the rank-0 "
                "worker process.")

COLUMNS = [  # (summary key, header, format)
    ("strategy", "strategy", "{}"),
    ("engine", "engine", "{}"),
    ("trainable_params", "trainable", "{:,}"),
    ("loss_first", "loss first", "{:.3f}"),
    ("loss_last", "loss last", "{:.3f}"),
    ("eval_loss_before", "eval before", "{:.3f}"),
    ("eval_loss_after", "eval after", "{:.3f}"),
    ("eval_accuracy_after", "eval accuracy", "{:.3f}"),
    ("eval_exact_match_before", "exact match before", "{:.2f}"),
    ("eval_exact_match_after", "exact match after", "{:.2f}"),
    ("quality_vs_full", "quality % of full", "{:.1f}"),
    ("forgetting", "retain loss change", "{:+.3f}"),
    ("peak_rss_mb", "peak RSS MiB", "{:,.0f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("wall_time_s", "wall s", "{:.1f}"),
    ("export_bytes", "export bytes", "{:,}"),
]


def quality_vs_full(results: dict) -> None:
    """Each variant's quality as a percentage of the full fine-tuning variant's (if there is one).

    Classification: eval accuracy after training; instruction and chat: exact match after
    training. Language modelling: the eval-loss gain (before - after), since a loss has no natural 100%.
    """
    full = next((r for r in results.values() if r["strategy"].startswith("full")), None)
    if full is None:
        return
    for r in results.values():
        score = next((k for k in ("eval_accuracy_after", "eval_exact_match_after")
                      if full.get(k) and r.get(k) is not None), None)
        if score:
            r["quality_vs_full"] = 100 * r[score] / full[score]
        elif None not in (full.get("eval_loss_before"), full.get("eval_loss_after"),
                          r.get("eval_loss_before"), r.get("eval_loss_after")):
            gain = full["eval_loss_before"] - full["eval_loss_after"]
            if gain > 0:
                r["quality_vs_full"] = 100 * (r["eval_loss_before"] - r["eval_loss_after"]) / gain


register_kind(Compare())
