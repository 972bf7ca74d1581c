"""`unite`: the command line of the UNITE pipeline (Typer).

    unite prepare | classifier | train | evaluate | analyze     the DVC stages, one at a time
    unite sample --classes 0,1,2 --cfg-scale 3                   a grid of samples from a checkpoint
    unite import-checkpoint FILE                                 the authors' released weights, as a project checkpoint
    unite preset NAME                                            params.yaml := presets/NAME.yaml over the default
    unite ui [--port 5000]                                       the MLflow UI on this project's runs
    unite sweep | compare                                        when this build has them
    unite bench [NAME [OPTIONS]]                                 run a benchmark of benchmarks/ (JSON lines)

Every command reads params.yaml (or --params FILE), takes `--set section.key=value` overrides
(repeatable, validated like the file) and `--debug`. A user error (bad params, missing data or
checkpoint, failed training, ...) prints one `error: ...` line on stderr and exits 1; --debug shows
the traceback. Outputs go below the current directory (the project root).
"""

from __future__ import annotations

import importlib
import importlib.util
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

from .commands import (DEFAULT_PARAMS, DebugOption, ParamsOption, QuietOption, SetOption, err_console, load_cfg,
                       project_root, run_stage)

log = logging.getLogger(__name__)

app = typer.Typer(
    name="unite",
    help="UNITE pipeline: prepare data, train (Ray Train), sample, evaluate, analyze; runs tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

#: optional commands: name -> (stage module to fall back on, or None; help text)
OPTIONAL_COMMANDS = {
    "classifier": ("classifier", "Train the dataset's own feature classifier (embedded FID features)."),
    "evaluate": ("evaluate", "Evaluate the trained model (metrics/evaluate.json)."),
    "analyze": ("analyze", "Analyses of the trained model (alignment, probe, compression)."),
    "sweep": (None, "Ray Tune sweep over the `sweep:` section of the params."),
    "compare": (None, "UNITE vs its ablations and the two-stage baseline at equal budget."),
    "bench": (None, "Run a benchmark (benchmarks/NAME.py) and print its JSON lines; no NAME lists them."),
}


# ----------------------------------------------------------------------------------------------
# Core commands
# ----------------------------------------------------------------------------------------------
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
    classes: Annotated[Optional[str], typer.Option(
        "--classes", help="class ids, e.g. 0,1,2 or 0-4 (default: every class, class-balanced)",
        show_default=False)] = None,
    per_class: Annotated[Optional[int], typer.Option(
        "--per-class", min=1, help="samples per class (default: sample.num_samples / classes)",
        show_default=False)] = None,
    cfg_scale: Annotated[Optional[float], typer.Option(
        "--cfg-scale", min=0.0, help="classifier-free guidance scale (default: sample.cfg_scale)",
        show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write")] = Path("reports/samples.png"),
) -> None:
    """Write a grid of generated samples (one row per class) from a checkpoint, with EMA weights."""
    from .stages.sample import parse_classes

    run_stage("sample", params, set_, debug, quiet=quiet, write_metrics=False, options={
        "checkpoint": checkpoint, "classes": parse_classes(classes), "per_class": per_class,
        "cfg_scale": cfg_scale, "out": out,
    })


@app.command("import-checkpoint")
def import_checkpoint(
    file: Annotated[Path, typer.Argument(help="the authors' released .pt file (UNITE-B or UNITE-L)")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="project checkpoint to write (default: models/imported/<file stem>.pt)",
        show_default=False)] = None,
    in_context_start: Annotated[int, typer.Option(
        "--in-context-start", min=0, help="block from which class tokens join (not stored in the weights; "
        "the authors' config: 4)")] = 4,
    data_root: Annotated[Optional[str], typer.Option(
        "--data-root", help="ImageNet train/ folder to write into the params (for evaluate/resume)",
        show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option(
        "--epochs", min=1, help="epochs of the full schedule for a resumed run (default 240)",
        show_default=False)] = None,
    debug: DebugOption = False,
) -> None:
    """Convert an authors' UNITE checkpoint into a project checkpoint (+ <out>.params.yaml beside it, and
    <out>.perceptual.pt with their LPIPS weights when present), for sample / evaluate / analyze / train."""
    from unite_core.authors import import_checkpoint as convert

    dest = out or Path("models/imported") / f"{file.stem}.pt"
    result = convert(file, dest, in_context_start=in_context_start, data_root=data_root, epochs=epochs)
    m = result.config.model
    depth, width, _ = m.ge_dims()
    ddepth, dwidth, _ = m.decoder_dims()
    lines = [
        f"imported {file} (step {result.step}) -> {result.checkpoint}",
        f"  model: GE {depth} x {width}, decoder {ddepth} x {dwidth}, K={m.latent_tokens} x d={m.latent_dim}, "
        f"{result.config.data.image_size}px, patch {m.patch_size}; optimiser state "
        f"{'imported' if result.optimizer_state else 'not present: a resumed run starts its optimisers fresh'}",
        f"  params: {result.params}" + (f"; perceptual-loss weights: {result.perceptual}" if result.perceptual else ""),
        f"  next:   unite sample -c {result.checkpoint} -p {result.params}",
        f"          unite evaluate -c {result.checkpoint} -p {result.params}   (after setting data.root)",
        f"          unite train -p {result.params}   (continues training from the imported state)",
    ]
    typer.echo("\n".join(lines))


@app.command()
def preset(
    name: Annotated[str, typer.Argument(help="a preset of presets/ (e.g. digits_tiny), or a preset file's path")],
    out: Annotated[Path, typer.Option("--out", "-o", help="params file to write")] = DEFAULT_PARAMS,
    debug: DebugOption = False,
) -> None:
    """Make params.yaml a preset (for `dvc repro`): the preset over the embedded default, every key written out.

    `git checkout params.yaml` restores the embedded default. `--params presets/NAME.yaml` uses a
    preset for one command without touching params.yaml."""
    from unite_core.config import PRESET_MARK, ConfigError, preset_params_text
    from unite_core.io import atomic_write_text

    path = Path(name) if name.endswith((".yaml", ".yml")) else Path("presets") / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path("presets").glob("*.yaml"))
        raise ConfigError(f"preset '{name}' not found ({path}): the presets are {', '.join(known) or 'none here'} "
                          "(run from the project root)")
    label = path.stem if path.parent == Path("presets") else name
    if out.is_file() and out.read_text(errors="replace").startswith(f"{PRESET_MARK}{label}`"):
        typer.echo(f"{out} holds preset {label} already (`git checkout {out}` first to write it afresh): "
                   "nothing written")
        return
    text = preset_params_text(path, label)
    if out.is_file() and _same_settings(path, out):  # presets/mnist5k.yaml over an unedited params.yaml
        typer.echo(f"{out} holds these settings already ({path} changes nothing in it): nothing written")
        return
    atomic_write_text(out, text)
    typer.echo(f"{out}: preset {label} ({path} over the embedded default); `git checkout {out}` restores the default")


def _same_settings(a: Path, b: Path) -> bool:
    from unite_core.config import ConfigError, load_config

    try:
        return load_config(a) == load_config(b)
    except ConfigError:
        return False


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


# ----------------------------------------------------------------------------------------------
# Optional commands: pipelines.commands.<name>.register(app), or a stage fallback, or a stub
# ----------------------------------------------------------------------------------------------
def _stage_command(name: str, help_text: str) -> None:
    def command(params: ParamsOption = DEFAULT_PARAMS, set_: SetOption = None, debug: DebugOption = False,
                quiet: QuietOption = False) -> None:
        run_stage(name, params, set_, debug, quiet=quiet)

    command.__name__ = name
    command.__doc__ = help_text
    app.command(name)(command)


def _stub_command(name: str, message: str, code: int, help_text: str) -> None:
    def command(args: Annotated[Optional[List[str]], typer.Argument(hidden=True)] = None) -> None:
        sys.stderr.write(f"error: {message}\n")
        raise typer.Exit(code)

    command.__name__ = name
    command.__doc__ = f"{help_text} (not available in this build)"
    app.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})(command)


_registered: set[str] = set()


def register_optional(only: str | None = None) -> None:
    """Add the optional commands to `app` (just `only` when given: importing every command module
    costs seconds, and dispatching one command needs only that one)."""
    for name, (stage, help_text) in OPTIONAL_COMMANDS.items():
        if (only is not None and name != only) or name in _registered:
            continue
        _registered.add(name)
        module_name = f"{__package__}.commands.{name}"
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ImportError:
            found = False
        if found:
            try:
                module = importlib.import_module(module_name)
                register = getattr(module, "register")
                register(app)
                continue
            except Exception as exc:  # noqa: BLE001 - one broken module must not break the CLI
                log.debug("command module %s failed to load", module_name, exc_info=True)
                _stub_command(name, f"`unite {name}` failed to load ({type(exc).__name__}: {exc}); "
                                    "rerun with --debug for details", 1, help_text)
                continue
        if stage is not None and importlib.util.find_spec(f"{__package__}.stages.{stage}") is not None:
            _stage_command(name, help_text)
        else:
            _stub_command(name, f"`unite {name}` is not available in this build", 2, help_text)


def get_app() -> typer.Typer:
    """The app with every command registered (for `typer.testing.CliRunner` and documentation)."""
    register_optional()
    return app


# ----------------------------------------------------------------------------------------------
# Entry point: logging and error handling for every command (ours and the registered ones)
# ----------------------------------------------------------------------------------------------
def _core_commands() -> set[str]:
    return {c.name or c.callback.__name__ for c in app.registered_commands}


def is_user_error(exc: BaseException) -> bool:
    """Errors whose message is meant for the user: *Error classes defined in unite_core or pipelines."""
    for cls in type(exc).__mro__:
        mod = getattr(cls, "__module__", "") or ""
        if cls.__name__.endswith("Error") and (mod.startswith("unite_core") or mod.startswith("pipelines")):
            return True
    return False


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
    words = [a for a in argv if not a.startswith("-")]
    first = words[0] if words else None
    if first in OPTIONAL_COMMANDS:
        register_optional(first)
    elif first is None or first not in _core_commands():
        register_optional()  # top-level help or an unknown command: list everything
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
