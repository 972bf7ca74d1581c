"""`unite`: the command line of the UNITE pipeline (Typer).
Over 500 lines because every command's options and help live here (Typer reads them from the signatures).

    unite prepare | classifier | train | evaluate | analyze     the DVC stages, one at a time
    unite sample --classes 0,1,2 --cfg-scale 3                   a grid of samples from a checkpoint
    unite import-checkpoint FILE                                 the authors' released weights, as a project checkpoint
    unite preset NAME                                            params.yaml := presets/NAME.yaml over the default
    unite ui [--port 5000]                                       the MLflow UI on this project's runs
    unite sweep | compare                                        a Ray Tune sweep; UNITE vs its ablations
    unite bench [NAME [OPTIONS]]                                 run a benchmark of benchmarks/ (JSON lines)

Commands read params.yaml (--params), take `--set section.key=value` and `--debug`; a user error prints one
`error: ...` line and exits 1 (--debug: the traceback). Outputs go below the current directory.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from .console import RichReporter, console, err_console, print_result

log = logging.getLogger(__name__)

DEFAULT_PARAMS = Path("params.yaml")
ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params file (every key is validated)")]
SetOption = Annotated[
    Optional[List[str]],
    typer.Option("--set", "-s", help="override a parameter: section.key=value (repeatable)", show_default=False),
]
#: an option whose default comes from the params or the command (its help says which): no "None" shown
Unset = functools.partial(typer.Option, show_default=False)
DebugOption = Annotated[bool, typer.Option("--debug", help="debug logging and full tracebacks on errors")]
QuietOption = Annotated[bool, typer.Option(
    "--quiet", "-q", help="no progress bars: a progress line (with ETA) every 30 s instead, as when stderr is no terminal")]

app = typer.Typer(
    name="unite",
    help="UNITE pipeline: prepare data, train (Ray Train), sample, evaluate, analyze; runs tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def project_root() -> Path:
    return Path.cwd().resolve()


def load_cfg(params: Path, overrides: list[str] | None):
    from unite_core.config import load_config

    return load_config(params, list(overrides or []))


def run_stage(stage: str, params: Path, overrides: list[str] | None, debug: bool = False, *, quiet: bool = False,
              options: dict | None = None, write_metrics: bool = True) -> dict:
    from .stages import execute

    cfg = load_cfg(params, overrides)
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    root = project_root()
    t0 = time.perf_counter()
    result = execute(stage, cfg, root, params_path=Path(params), overrides=list(overrides or []), debug=debug,
                     reporter=RichReporter(quiet=quiet), options=options, write_metrics=write_metrics)
    print_result(stage, result, time.perf_counter() - t0, root, write_metrics)
    return result


# --- Commands: each runs its stage (pipelines/stages/<name>.py) through run_stage ---
@app.command()
def prepare(params: ParamsOption = DEFAULT_PARAMS, set_: SetOption = None, debug: DebugOption = False,
            quiet: QuietOption = False) -> None:
    """Prepare the dataset into data/<dataset>/ (counts and content hash in metrics/prepare.json)."""
    run_stage("prepare", params, set_, debug, quiet=quiet)


@app.command()
def train(params: ParamsOption = DEFAULT_PARAMS, set_: SetOption = None, debug: DebugOption = False,
          quiet: QuietOption = False) -> None:
    """Train on the prepared data (Ray Train with distributed.num_workers workers; 0 = in-process).

    Writes models/unite.pt, metrics/train.json, plots/train_curve.csv and plots/train_reconstructions.png.
    An interrupted run with the same params resumes; a finished one is exported without training.
    """
    run_stage("train", params, set_, debug, quiet=quiet)


@app.command()
def sample(
    params: ParamsOption = DEFAULT_PARAMS,
    set_: SetOption = None,
    debug: DebugOption = False,
    quiet: QuietOption = False,
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="checkpoint to sample from")] = Path(
        "models/unite.pt"),
    classes: Annotated[Optional[str], Unset(
        "--classes", help="class ids, e.g. 0,1,2 or 0-4 (default: every class, class-balanced)")] = None,
    per_class: Annotated[Optional[int], Unset(
        "--per-class", min=1, help="samples per class (default: sample.num_samples / classes)")] = None,
    cfg_scale: Annotated[Optional[float], Unset(
        "--cfg-scale", min=0.0, help="classifier-free guidance scale (default: sample.cfg_scale)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write")] = Path("reports/samples.png"),
) -> None:
    """Write a grid of generated samples (one row per class) from a checkpoint, with EMA weights."""
    from unite_core.pictures import parse_classes

    run_stage("sample", params, set_, debug, quiet=quiet, write_metrics=False, options={
        "checkpoint": checkpoint, "classes": parse_classes(classes), "per_class": per_class,
        "cfg_scale": cfg_scale, "out": out,
    })


@app.command("import-checkpoint")
def import_checkpoint(
    file: Annotated[Path, typer.Argument(help="the authors' released .pt file (UNITE-B or UNITE-L)")],
    out: Annotated[Optional[Path], Unset(
        "--out", "-o", help="project checkpoint to write (default: models/imported/<file stem>.pt)")] = None,
    in_context_start: Annotated[int, typer.Option(
        "--in-context-start", min=0, help="block from which class tokens join (not stored in the weights; "
        "the authors' config: 4)")] = 4,
    data_root: Annotated[Optional[str], Unset(
        "--data-root", help="ImageNet train/ folder to write into the params (for evaluate/resume)")] = None,
    epochs: Annotated[Optional[int], Unset(
        "--epochs", min=1, help="epochs of the full schedule for a resumed run (default 240)")] = None,
    debug: DebugOption = False,
) -> None:
    """Convert an authors' UNITE checkpoint into a project checkpoint (+ <out>.params.yaml beside it, and
    <out>.perceptual.pt with their LPIPS weights when present), for sample / evaluate / analyze / train."""
    from unite_core.authors import import_checkpoint as convert

    dest = out or Path("models/imported") / f"{file.stem}.pt"
    result = convert(file, dest, in_context_start=in_context_start, data_root=data_root, epochs=epochs)
    typer.echo(result.describe(file))


@app.command()
def preset(
    name: Annotated[str, typer.Argument(help="a preset of presets/ (e.g. digits_tiny), or a preset file's path")],
    out: Annotated[Path, typer.Option("--out", "-o", help="params file to write")] = DEFAULT_PARAMS,
    debug: DebugOption = False,
) -> None:
    """Make params.yaml a preset (for `dvc repro`): the preset over the embedded default, every key written out.

    `git checkout params.yaml` restores the embedded default. `--params presets/NAME.yaml` uses a
    preset for one command without touching params.yaml."""
    from unite_core.config import write_preset

    typer.echo(write_preset(name, out))


@app.command()
def ui(
    params: ParamsOption = DEFAULT_PARAMS,
    set_: SetOption = None,
    debug: DebugOption = False,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="port on 127.0.0.1")] = 5000,
) -> None:
    """Start the MLflow UI on this project's runs, bound to 127.0.0.1 (Ctrl-C stops it)."""
    from .tracking import tracking_uri

    cfg = load_cfg(params, set_) if Path(params).is_file() or set_ else None
    uri = tracking_uri(project_root())
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port)]
    experiment = cfg.tracking.experiment if cfg else "unite"
    err_console().print(f"MLflow UI on {uri}: http://127.0.0.1:{port}/#/experiments (experiment '{experiment}'); "
                        "Ctrl-C stops it", markup=False)
    # a viewer needs no background job runner (MLflow 3 starts seven worker processes for it)
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    log.debug("running %s", cmd)
    # its own process group: stopping `unite ui` (Ctrl-C or SIGTERM) stops mlflow's whole tree
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=None if debug else subprocess.DEVNULL,
                            stderr=None if debug else subprocess.PIPE)

    def stop(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        _, err = proc.communicate()
        code = proc.returncode
    except KeyboardInterrupt:
        _stop_group(proc)
        raise typer.Exit(0)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            _stop_group(proc)
    if code != 0:
        tail = (err.decode(errors="replace").strip().splitlines() or [""])[-1] if err else ""
        raise UIError(f"mlflow ui exited with code {code}: {tail or 'rerun with --debug'}")


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the child's process group, SIGKILL to what is left after grace_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its group may not be
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(1.0)


class UIError(RuntimeError):
    """`mlflow ui` failed (port in use, broken store)."""


@app.command()
def classifier(params: ParamsOption = DEFAULT_PARAMS, set_: SetOption = None, debug: DebugOption = False,
               quiet: QuietOption = False) -> None:
    """Train the own feature classifier for eval.classifier_steps steps; report its val accuracy
    (models/classifier.pt, metrics/classifier.json)."""
    run_stage("classifier", params, set_, debug, quiet=quiet)


@app.command()
def evaluate(
    params: ParamsOption = DEFAULT_PARAMS,
    set_: SetOption = None,
    debug: DebugOption = False,
    quiet: QuietOption = False,
    checkpoint: Annotated[Optional[Path], Unset(
        "--checkpoint", "-c",
        help="evaluate this checkpoint (rebuilt from its own saved config) instead of models/unite.pt")] = None,
) -> None:
    """gFID/KID/precision-recall/IS and conditional accuracy over eval.cfg_scales (best scale + curve),
    rFID/PSNR/SSIM on the val set, noise floor FID(val vs train); writes plots/guidance_curve.csv,
    plots/samples.png and plots/reconstructions.png."""
    run_stage("evaluate", params, set_, debug, quiet=quiet, options={"checkpoint": checkpoint})


@app.command()
def analyze(
    params: ParamsOption = DEFAULT_PARAMS,
    set_: SetOption = None,
    debug: DebugOption = False,
    quiet: QuietOption = False,
    checkpoint: Annotated[Optional[Path], Unset(
        "--checkpoint", "-c", help="analyse this checkpoint instead of models/unite.pt")] = None,
    variant: Annotated[Optional[List[str]], Unset(
        "--variant", help="an ablation checkpoint NAME=PATH to compare (repeatable; models/compare/*.pt from "
        "`unite compare` are found without it)")] = None,
    sweep_csv: Annotated[Optional[Path], Unset(
        "--sweep-csv", help="sweep results for the rate-distortion table (default: reports/sweep.csv)")] = None,
    class_mode: Annotated[str, typer.Option(
        "--class-mode", help="class of the denoising pass: null (as the tokenization pass) or label")] = "null",
    notebooks: Annotated[bool, typer.Option(
        "--notebooks", help="also execute the notebooks in notebooks/ (papermill) into reports/notebooks/")] = False,
) -> None:
    """Alignment (CKA/CKNNA per GE block, cosine vs t), linear probes, weight description length, and the
    rate-distortion table of a sweep: metrics/analyze.json, plots/*.csv and plots/*.png."""
    from .stages.analyze import parse_variants

    run_stage("analyze", params, set_, debug, quiet=quiet, options={
        "checkpoint": checkpoint, "variants": parse_variants(variant), "sweep_csv": sweep_csv,
        "class_mode": class_mode, "notebooks": notebooks,
    })


@app.command()
def sweep(
    params: ParamsOption = DEFAULT_PARAMS,
    set_: SetOption = None,
    debug: DebugOption = False,
    quiet: QuietOption = False,
    trials: Annotated[Optional[int], Unset(
        "--trials", min=1, help="run only the first N trials (random search: draw N; default: sweep.num_samples "
        "or the whole grid)")] = None,
    concurrency: Annotated[Optional[int], Unset(
        "--concurrency", min=1, help="trials at a time (default: sweep.max_concurrent)")] = None,
    steps: Annotated[Optional[int], Unset(
        "--steps", min=1, help="training steps per trial (default: sweep.steps, else train.steps)")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="continue the interrupted sweep with these settings (finished trials are kept)")] = False,
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="delete an existing sweep with these settings and start over")] = False,
) -> None:
    """Ray Tune sweep: each trial trains through Ray Train (like `unite train`) and is one MLflow child run;
    writes reports/sweep.csv (a row per trial: params, val PSNR, rFID, latent rate, time) and
    reports/best_params.yaml (your params with the best trial's values, for `dvc exp run`)."""
    run_stage("sweep", params, set_, debug, quiet=quiet, options={
        "trials": trials, "concurrency": concurrency, "steps": steps, "resume": resume, "fresh": fresh,
    })


COMPARE_VARIANTS = ("unite,two_stage,separate_weights,unite_param_matched,unite_2x_steps,separate_weights_2x_steps,"
                    "no_stop_grad,no_noise_aug,flow_minibatches_1,no_shift")  # unite_core.ablations.DEFAULT_VARIANTS (tested)


@app.command()
def compare(
    params: ParamsOption = DEFAULT_PARAMS,
    set_: SetOption = None,
    debug: DebugOption = False,
    quiet: QuietOption = False,
    variants: Annotated[str, typer.Option("--variants", help="comma-separated variants")] = COMPARE_VARIANTS,
    minutes: Annotated[Optional[float], Unset(
        "--minutes", min=0.0, help="training wall-clock per variant (default: train.time_limit_minutes)")] = None,
    samples: Annotated[Optional[int], Unset(
        "--samples", min=2, help="samples per guidance scale (default: eval.num_samples)")] = None,
    scales: Annotated[Optional[str], Unset(
        "--scales", help="guidance scales, e.g. 1,2,3 (default: eval.cfg_scales)")] = None,
    budget: Annotated[str, typer.Option(
        "--budget", help="time: equal wall-clock per variant; steps: train.steps optimizer steps per network")] = "time",
    steps: Annotated[Optional[int], Unset(
        "--steps", min=1, help="override train.steps (step cap and schedule length)")] = None,
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


# --- unite bench: `python benchmarks/<name>.py [options]` from the project folder (the current directory, else
# this package's checkout); its JSON lines to stdout, other lines to stderr; its exit code ---
class BenchError(RuntimeError):
    """No benchmarks folder, or no benchmark of that name; the message lists what there is."""


def benchmarks_dir() -> Path | None:
    for root in (project_root(), Path(__file__).resolve().parents[1]):
        folder = root / "benchmarks"
        if folder.is_dir() and any(folder.glob("*.py")):
            return folder
    return None


def _benchmarks(folder: Path) -> dict[str, str]:
    """name -> first line of the module docstring, for every benchmarks/<name>.py (read, not imported)."""
    found = {}
    for path in sorted(folder.glob("*.py")):
        if not path.name.startswith("_"):
            try:
                doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            except (OSError, SyntaxError, ValueError):
                doc = ""
            found[path.stem] = (doc.strip().splitlines() or [""])[0]
    return found


def _is_json(line: str) -> bool:
    try:
        return line.strip().startswith(("{", "[")) and json.loads(line) is not None
    except ValueError:
        return False


def _run_benchmark(script: Path, args: list[str]) -> int:
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=script.parent.parent, stdout=subprocess.PIPE,
                            stderr=None, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            stream = sys.stdout if _is_json(line) else sys.stderr
            stream.write(line)
            stream.flush()
        return proc.wait()
    except BaseException:  # Ctrl-C / SIGTERM: stop the benchmark too
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


@app.command("bench", add_help_option=False,
             context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def bench(
    name: Annotated[Optional[str], typer.Argument(help="benchmark to run (none: list them)", show_default=False)] = None,
    args: Annotated[Optional[List[str]], typer.Argument(help="options passed to the benchmark",
                                                        show_default=False)] = None,
) -> None:
    """Run a benchmark (benchmarks/NAME.py) and print its JSON lines; no NAME lists them."""
    folder = benchmarks_dir()
    if folder is None:
        raise BenchError("no benchmarks/ folder here or in this package's checkout: run `unite bench` from "
                         "the project folder")
    found = _benchmarks(folder)
    if name in (None, "-h", "--help"):
        out = console()
        out.print(f"benchmarks in {folder} (run one with `unite bench NAME [OPTIONS]`, its options with "
                  "`unite bench NAME --help`):", markup=False)
        width = max(len(n) for n in found)
        for bench_name, doc in found.items():
            out.print(f"  {bench_name:<{width}}  {doc}", markup=False)
        return
    if name not in found:
        raise BenchError(f"no benchmark '{name}': choose one of {', '.join(found)} (`unite bench` lists them)")
    code = _run_benchmark(folder / f"{name}.py", [a for a in (args or []) if a != "--debug"])  # --debug: unite's
    if code != 0:
        err_console().print(f"error: benchmark {name} exited with code {code} (its messages are above)", markup=False)
        raise typer.Exit(code)


# --- Entry point: logging and error handling for every command ---
def is_user_error(exc: BaseException) -> bool:
    """Errors whose message is meant for the user: *Error classes defined in unite_core or pipelines."""
    return any(cls.__name__.endswith("Error") and (getattr(cls, "__module__", "") or "").startswith(
        ("unite_core", "pipelines")) for cls in type(exc).__mro__)


def setup_logging(debug: bool) -> None:
    if err_console().is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err_console(), show_time=debug, show_path=debug,
                                               markup=False, rich_tracebacks=False, log_time_format="%H:%M:%S")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # logs, CI: one plain line per record, no wrapping
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    for name in ("pipelines", "unite_core"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        for name in ("ray", "alembic", "mlflow", "urllib3", "matplotlib", "PIL", "git", "filelock"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines) if len(lines) <= 3 else lines[0]


def _click_exceptions():
    """(Exit, ClickException, Abort) classes: Typer's own (it vendors click since 0.20) and click's."""
    import importlib

    found: dict[str, list[type]] = {"Exit": [], "ClickException": [], "Abort": []}
    for module in ("typer.exceptions", "typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for name, classes in found.items():
            cls = getattr(mod, name, None)
            if isinstance(cls, type) and cls not in classes:
                classes.append(cls)
    return tuple(tuple(found[name]) for name in ("Exit", "ClickException", "Abort"))


def _disk_error(exc: BaseException) -> str | None:
    """One line for a full disk met outside unite_core.io's writers (Ray, MLflow, torch), else None."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" to write '{exc.filename}'" if exc.filename else ""
        return f"no space left on the device{where}: free some space (or move the project to a larger disk) and " \
               "run the command again"
    return None


def main(argv: list[str] | None = None) -> None:
    from .interrupt import Interrupted, install_default_handlers

    exit_types, click_errors, abort_types = _click_exceptions()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # a user turns it on with =false
    install_default_handlers()
    setup_logging(debug)
    command = typer.main.get_command(app)
    try:
        # click's make_context + invoke rather than command.main: Typer's main turns a KeyboardInterrupt
        # into a bare exit code 130, losing the message that says how to resume
        with command.make_context("unite", argv) as ctx:
            code = command.invoke(ctx)
        code = code if isinstance(code, int) else 0
    except exit_types as exc:
        code = exc.exit_code
    except click_errors as exc:  # usage errors: click's own message, exit 2
        exc.show()
        code = exc.exit_code
    except BrokenPipeError:  # `unite bench ... | head`: the reader left; say nothing more
        sys.stdout = open(os.devnull, "w")
        code = 1
    except Interrupted as exc:  # a signal: the message says what was kept and how to go on
        sys.stderr.write(f"error: {_one_line(exc)}\n")
        code = exc.exit_code
    except (*abort_types, KeyboardInterrupt):
        err_console().print("error: interrupted", markup=False)
        code = 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
        if debug:
            raise
        if is_user_error(exc):
            msg = _one_line(exc)
        elif _disk_error(exc):
            msg = _disk_error(exc)
        else:
            msg = f"unexpected {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)"
        sys.stderr.write(f"error: {msg}\n")
        code = 1
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":  # python -m pipelines.cli
    main()
