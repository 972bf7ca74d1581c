"""`unite classifier`: train the dataset's own feature network (models/classifier.pt) for the embedded FID."""

from __future__ import annotations

import typer

from . import DEFAULT_PARAMS, DebugOption, ParamsOption, QuietOption, SetOption, run_stage


def register(app: typer.Typer) -> None:
    @app.command("classifier")
    def classifier(params: ParamsOption = DEFAULT_PARAMS, set_: SetOption = None, debug: DebugOption = False,
                   quiet: QuietOption = False) -> None:
        """Train the own feature classifier for eval.classifier_steps steps; report its val accuracy
        (models/classifier.pt, metrics/classifier.json)."""
        run_stage("classifier", params, set_, debug, quiet=quiet)
