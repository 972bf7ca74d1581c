"""`unite compare`: UNITE, its ablations and the two-stage baseline at equal budget -> reports/compare.md."""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from . import DEFAULT_PARAMS, DebugOption, ParamsOption, QuietOption, SetOption, run_stage


def register(app: typer.Typer) -> None:
    from ..stages.compare import DEFAULT_VARIANTS

    @app.command("compare")
    def compare(
        params: ParamsOption = DEFAULT_PARAMS,
        set_: SetOption = None,
        debug: DebugOption = False,
        quiet: QuietOption = False,
        variants: Annotated[str, typer.Option(
            "--variants", help="comma-separated variants")] = ",".join(DEFAULT_VARIANTS),
        minutes: Annotated[Optional[float], typer.Option(
            "--minutes", min=0.0, help="training wall-clock per variant (default: train.time_limit_minutes)",
            show_default=False)] = None,
        samples: Annotated[Optional[int], typer.Option(
            "--samples", min=2, help="samples per guidance scale (default: eval.num_samples)", show_default=False)] = None,
        scales: Annotated[Optional[str], typer.Option(
            "--scales", help="guidance scales, e.g. 1,2,3 (default: eval.cfg_scales)", show_default=False)] = None,
        budget: Annotated[str, typer.Option(
            "--budget", help="time: equal wall-clock per variant; steps: train.steps optimizer steps per network")] = "time",
        steps: Annotated[Optional[int], typer.Option(
            "--steps", min=1, help="override train.steps (step cap and schedule length)", show_default=False)] = None,
        tokenizer_fraction: Annotated[float, typer.Option(
            "--tokenizer-fraction", help="two-stage baseline: share of its budget for stage 1 (the tokenizer)")] = 0.5,
        seeds: Annotated[int, typer.Option(
            "--seeds", min=1, help="trainings per variant (train.seed, train.seed+1, ...); the verdicts use their "
            "spread")] = 3,
        jobs: Annotated[int, typer.Option(
            "--jobs", min=1, help="trainings run in parallel processes (several share one GPU; CPU threads are "
            "split)")] = 1,
    ) -> None:
        """Train and evaluate each variant with N seeds at equal budget (reports/compare.md: mean +- std and a
        verdict per paper direction; .csv: one row per variant and seed; one MLflow run each); resumable:
        (variant, seed) rows already in reports/compare.csv with the same settings are skipped."""
        run_stage("compare", params, set_, debug, quiet=quiet, options={
            "variants": variants, "minutes": minutes, "samples": samples, "scales": scales, "budget": budget,
            "steps": steps, "tokenizer_fraction": tokenizer_fraction, "seeds": seeds, "jobs": jobs,
        })
