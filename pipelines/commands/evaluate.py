"""`unite evaluate`: guidance sweep, reconstruction metrics and noise floor of the trained model.

Registered by pipelines/cli.py; runs pipelines.stages.evaluate through the shared stage runner
(params validation, MLflow child run, metrics/evaluate.json, progress, one-line errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from . import DEFAULT_PARAMS, DebugOption, ParamsOption, QuietOption, SetOption, run_stage


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate(
        params: ParamsOption = DEFAULT_PARAMS,
        set_: SetOption = None,
        debug: DebugOption = False,
        quiet: QuietOption = False,
        checkpoint: Annotated[Optional[Path], typer.Option(
            "--checkpoint", "-c",
            help="evaluate this checkpoint (rebuilt from its own saved config) instead of models/unite.pt",
            show_default=False)] = None,
    ) -> None:
        """gFID/KID/precision-recall/IS and conditional accuracy over eval.cfg_scales (best scale + curve),
        rFID/PSNR/SSIM on the val set, noise floor FID(val vs train); writes plots/guidance_curve.csv,
        plots/samples.png and plots/reconstructions.png."""
        run_stage("evaluate", params, set_, debug, quiet=quiet, options={"checkpoint": checkpoint})
