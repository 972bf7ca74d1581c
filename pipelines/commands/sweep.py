"""`unite sweep`: Ray Tune over the `sweep:` section of the params (see pipelines/sweep.py)."""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from . import DEFAULT_PARAMS, DebugOption, ParamsOption, QuietOption, SetOption, run_stage


def register(app: typer.Typer) -> None:
    @app.command("sweep")
    def sweep(
        params: ParamsOption = DEFAULT_PARAMS,
        set_: SetOption = None,
        debug: DebugOption = False,
        quiet: QuietOption = False,
        trials: Annotated[Optional[int], typer.Option(
            "--trials", min=1, help="run only the first N trials (random search: draw N; default: sweep.num_samples "
            "or the whole grid)", show_default=False)] = None,
        concurrency: Annotated[Optional[int], typer.Option(
            "--concurrency", min=1, help="trials at a time (default: sweep.max_concurrent)", show_default=False)] = None,
        steps: Annotated[Optional[int], typer.Option(
            "--steps", min=1, help="training steps per trial (default: sweep.steps, else train.steps)",
            show_default=False)] = None,
        resume: Annotated[bool, typer.Option(
            "--resume", help="continue the interrupted sweep with these settings (finished trials are kept)")] = False,
        fresh: Annotated[bool, typer.Option(
            "--fresh", help="delete an existing sweep with these settings and start over")] = False,
    ) -> None:
        """Ray Tune sweep: each trial trains through Ray Train (like `unite train`) and is one MLflow child run;
        writes reports/sweep.csv (a row per trial: params, val PSNR, rFID, latent rate, time) and
        reports/best_params.yaml (your params with the best trial's values, for `dvc exp run`)."""
        from .. import sweep as sweep_module

        run_stage("sweep", params, set_, debug, quiet=quiet, module=sweep_module, options={
            "trials": trials, "concurrency": concurrency, "steps": steps, "resume": resume, "fresh": fresh,
        })
