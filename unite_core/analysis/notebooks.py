"""The analysis notebooks (notebooks/*.py, jupytext percent format) executed with papermill on a project's
outputs: linear probes, rate-distortion, alignment. Each reads the CSVs the `analyze` and `sweep` stages
write and saves its figures beside the executed notebook.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

NOTEBOOKS = ("linear_probe", "rate_distortion", "alignment")


class NotebookError(RuntimeError):
    """An unknown notebook name; the message lists the known ones."""


def notebook_dir(root: Path) -> Path:
    """The project's notebooks/ folder, else the one of this package's checkout."""
    here = Path(root) / "notebooks"
    if (here / "alignment.py").is_file():
        return here
    return Path(__file__).resolve().parents[2] / "notebooks"


def notebook_parameters(name: str, root: Path, out_dir: Path) -> dict:
    root = Path(root)
    common = {"out_dir": str(out_dir)}
    if name == "linear_probe":
        return {**common, "probe_csv": str(root / "plots" / "probe.csv")}
    if name == "rate_distortion":
        return {**common, "sweep_csv": str(root / "reports" / "sweep.csv")}
    if name == "alignment":
        return {**common, "alignment_csv": str(root / "plots" / "alignment.csv"),
                "cosine_csv": str(root / "plots" / "cosine.csv"),
                "variants_csv": str(root / "plots" / "alignment_variants.csv")}
    raise NotebookError(f"unknown notebook {name!r}: known are {list(NOTEBOOKS)}")


def execute_notebook(source: Path, output: Path, parameters: dict, cwd: Path, timeout_s: int = 600) -> Path:
    """Execute a jupytext percent-format .py with papermill (raises on a failing cell) into `output`."""
    import jupytext
    import nbformat
    import papermill

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(source)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    src = output.with_name(output.stem + ".input.ipynb")
    nbformat.write(nb, src)
    try:
        papermill.execute_notebook(str(src), str(output), parameters=parameters, kernel_name="python3",
                                   cwd=str(cwd), progress_bar=False, log_output=False,
                                   execution_timeout=timeout_s, start_timeout=180,
                                   extra_arguments=["--IPKernelApp.log_level=ERROR"])
    finally:
        src.unlink(missing_ok=True)
    return output


def execute_notebooks(root: Path, out_dir: Path, names=NOTEBOOKS) -> list[Path]:
    """Run the notebooks on the outputs of the project at `root` into `out_dir`; the executed notebooks and
    the PNGs they saved. rate_distortion is skipped without reports/sweep.csv."""
    out_dir, done = Path(out_dir), []
    for name in names:
        params = notebook_parameters(name, root, out_dir)
        if name == "rate_distortion" and not Path(params["sweep_csv"]).is_file():
            log.info("notebook %s skipped: no %s (run `unite sweep`)", name, params["sweep_csv"])
            continue
        done.append(execute_notebook(notebook_dir(root) / f"{name}.py", out_dir / f"{name}.ipynb", params, root))
    return done + sorted(out_dir.glob("*.png"))
