"""`unite analyze`: the paper's analyses of the trained model (see pipelines/stages/analyze.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from . import DEFAULT_PARAMS, DebugOption, ParamsOption, QuietOption, SetOption, run_stage


class AnalyzeOptionError(ValueError):
    """A malformed --variant option."""


def parse_variants(items: list[str] | None) -> dict[str, Path] | None:
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise AnalyzeOptionError(f"--variant {item!r} must look like NAME=PATH, e.g. separate=models/sep.pt")
        out[name.strip()] = Path(path.strip())
    return out


def register(app: typer.Typer) -> None:
    @app.command("analyze")
    def analyze(
        params: ParamsOption = DEFAULT_PARAMS,
        set_: SetOption = None,
        debug: DebugOption = False,
        quiet: QuietOption = False,
        checkpoint: Annotated[Optional[Path], typer.Option(
            "--checkpoint", "-c", help="analyse this checkpoint instead of models/unite.pt", show_default=False)] = None,
        variant: Annotated[Optional[List[str]], typer.Option(
            "--variant", help="an ablation checkpoint NAME=PATH to compare (repeatable; models/compare/*.pt from "
            "`unite compare` are found without it)", show_default=False)] = None,
        sweep_csv: Annotated[Optional[Path], typer.Option(
            "--sweep-csv", help="sweep results for the rate-distortion table (default: reports/sweep.csv)",
            show_default=False)] = None,
        class_mode: Annotated[str, typer.Option(
            "--class-mode", help="class of the denoising pass: null (as the tokenization pass) or label")] = "null",
        notebooks: Annotated[bool, typer.Option(
            "--notebooks", help="also execute the notebooks in notebooks/ (papermill) into reports/notebooks/")] = False,
    ) -> None:
        """Alignment (CKA/CKNNA per GE block, cosine vs t), linear probes, weight description length, and the
        rate-distortion table of a sweep: metrics/analyze.json, plots/*.csv and plots/*.png."""
        run_stage("analyze", params, set_, debug, quiet=quiet, options={
            "checkpoint": checkpoint, "variants": parse_variants(variant), "sweep_csv": sweep_csv,
            "class_mode": class_mode, "notebooks": notebooks,
        })
