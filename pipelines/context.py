"""What every stage's `run(ctx)` receives: the validated config, absolute paths (ctx.paths), a tracker (an
MLflow child run or a no-op), a progress reporter (a rich bar in the CLI, else a no-op), the command's
options (ctx.options), and the project's inputs opened with one set of checks (ctx.open_data,
ctx.classifier, ctx.feature_spec: unite_core.inputs on this project's folders).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from unite_core import inputs
from unite_core.config import Config

from .tracking import NullTracker, Tracker


class Paths:
    """Absolute folders of a project root: data, models, metrics, plots, reports, .unite_cache."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.data, self.models, self.metrics = self.root / "data", self.root / "models", self.root / "metrics"
        self.plots, self.reports, self.cache = self.root / "plots", self.root / "reports", self.root / ".unite_cache"
        self.checkpoint = self.models / "unite.pt"  # the final trained model (DVC out of `train`)
        self.classifier = self.models / "classifier.pt"  # the dataset's feature classifier (`classifier`)

    @property
    def ray_storage(self) -> Path:
        """Run folders of training (Ray or in-process), in the project home (DVC_ROOT under DVC): a queued
        `dvc exp run` works in a temporary copy, and its run folder must outlive that copy."""
        from .tracking import project_home

        return project_home(self.root) / "ray_results"

    def dataset_dir(self, cfg: Config) -> Path:
        return self.data / cfg.data.dataset

    def stage_metrics(self, stage: str) -> Path:
        return self.metrics / f"{stage}.json"


class ProgressTask:
    """One progress bar: `update(completed, total=None, **fields)` (fields shown beside the bar)."""

    def update(self, completed: float, total: float | None = None, **fields: Any) -> None:  # noqa: D401
        return None


class Reporter:
    """Progress for long loops. The CLI passes a rich implementation; the default does nothing."""

    @contextmanager
    def progress(self, description: str, total: float | None) -> Iterator[ProgressTask]:
        yield ProgressTask()


@dataclass
class StageContext:
    cfg: Config
    root: Path
    tracker: Tracker = field(default_factory=NullTracker)
    params_path: Path | None = None
    overrides: list[str] = field(default_factory=list)
    debug: bool = False
    reporter: Reporter = field(default_factory=Reporter)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        self.paths = Paths(self.root)

    # the project's inputs (unite_core.inputs), from this project's folders
    def open_data(self, embedded: bool = True):
        return inputs.open_data(self.cfg, self.paths.dataset_dir(self.cfg), self.paths.cache / "data",
                                embedded=embedded)

    def feature_spec(self, data, device):
        return inputs.feature_spec(self.cfg, data, device, self.paths.classifier, self.paths.cache / "fidelity")

    def classifier(self, data, required: bool = True):
        return inputs.load_checked_classifier(self.paths.classifier, data, required=required)

    def train_classifier(self, data):
        return inputs.train_classifier(self.cfg, data, self.paths.classifier, progress=self.reporter.progress)
