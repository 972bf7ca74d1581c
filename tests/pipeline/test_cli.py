"""The `unite` command line as a user meets it: help with defaults, one-line errors with exit codes,
`unite sample` writing a grid. Every call is a real subprocess (exit codes and stderr as a shell sees them)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipelines.stages import execute
from tests.ray_fixtures import run_unite, tiny_params, write_params
from unite_core.config import config_from_dict


def assert_one_line_error(proc, *fragments: str, code: int = 1) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project with prepared digits and a 10-step model (in-process, no tracking)."""
    root = tmp_path_factory.mktemp("cli")
    params = tiny_params(train={"steps": 10, "warmup_steps": 2, "log_every": 5, "eval_every": 10,
                                "checkpoint_every": 10, "time_limit_minutes": None},
                         tracking={"enabled": False})
    write_params(root, params)
    cfg = config_from_dict(params)
    execute("prepare", cfg, root)
    execute("train", cfg, root)
    return root


def test_help_lists_every_command_and_shows_defaults(tmp_path):
    top = run_unite(["--help"], cwd=tmp_path)
    assert top.returncode == 0
    for name in ("prepare", "train", "sample", "import-checkpoint", "ui", "classifier", "evaluate", "analyze", "sweep",
                 "compare", "bench"):
        assert name in top.stdout, name
    sample = run_unite(["sample", "--help"], cwd=tmp_path)
    assert sample.returncode == 0
    for text in ("--params", "--set", "--debug", "--classes", "--per-class", "--cfg-scale", "--out",
                 "params.yaml", "models/unite.pt", "reports/samples.png"):
        assert text in sample.stdout, text


def test_user_errors_are_one_line_with_exit_code_1(project):
    cases = {
        "bad value": (["prepare", "--set", "train.lr=fast"], ["train.lr", "fast"]),
        "unknown key": (["train", "--set", "train.learning_rate=0.1"], ["unknown key 'train.learning_rate'"]),
        "not key=value": (["train", "--set", "train.lr"], ["section.key=value"]),
        "missing params file": (["train", "--params", "nowhere.yaml"], ["params file 'nowhere.yaml' not found"]),
        "missing checkpoint": (["sample", "--checkpoint", "models/missing.pt"], ["models/missing.pt", "not found"]),
        "class out of range": (["sample", "--classes", "3,12"], ["--classes [12]", "10 classes"]),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:  # each is a separate process start (a few seconds)
        results = dict(zip(cases, pool.map(lambda c: run_unite(c[0], cwd=project), cases.values())))
    for name, (_, fragments) in cases.items():
        assert_one_line_error(results[name], *fragments)


def test_debug_shows_the_traceback(project):
    proc = run_unite(["sample", "--checkpoint", "models/missing.pt", "--debug"], cwd=project)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "CheckpointError" in proc.stderr


def test_compare_help_default_lists_every_variant():
    """The CLI spells the default --variants without importing the stage (torch): the two must agree."""
    from pipelines.cli import COMPARE_VARIANTS
    from unite_core.ablations import DEFAULT_VARIANTS

    assert COMPARE_VARIANTS == ",".join(DEFAULT_VARIANTS)


def test_sample_writes_a_grid_of_the_requested_classes(project):
    from PIL import Image

    proc = run_unite(["sample", "--classes", "0,1,2", "--per-class", "4", "--cfg-scale", "3", "--out",
                      "grid.png"], cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 12 samples" in proc.stdout
    with Image.open(project / "grid.png") as img:
        # 3 rows x 4 columns of 8x8 tiles with 2-pixel gaps, upscaled 8x for viewing
        assert img.size == ((4 * 10 + 2) * 8, (3 * 10 + 2) * 8)
        assert img.mode == "L" and len(np.unique(np.asarray(img))) > 2


def test_unreadable_params_files_get_specific_messages(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "dated.yaml").write_text("tracking:\n  experiment: 2026-12-01\n")
    binary = run_unite(["prepare", "--params", "binary.yaml"], cwd=tmp_path)
    dated = run_unite(["prepare", "--params", "dated.yaml"], cwd=tmp_path)
    assert_one_line_error(binary, "params file 'binary.yaml' is binary")
    assert_one_line_error(dated, "tracking.experiment=2026-12-01 was read as a date", "quote it")


# ----------------------------------------------------------------------------------------------
# unite preset
# ----------------------------------------------------------------------------------------------
def test_preset_makes_params_yaml_the_preset_and_says_how_to_go_back(tmp_path):
    import shutil
    from pathlib import Path

    from unite_core.config import load_config

    repo = Path(__file__).resolve().parents[2]
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(repo / "presets", tmp_path / "presets")
    default = (tmp_path / "params.yaml").read_bytes()

    same = run_unite(["preset", "mnist5k"], cwd=tmp_path)  # the embedded default: nothing to change
    assert same.returncode == 0 and "nothing written" in same.stdout, same.stderr
    assert (tmp_path / "params.yaml").read_bytes() == default

    made = run_unite(["preset", "digits_tiny"], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "git checkout params.yaml" in made.stdout
    written = (tmp_path / "params.yaml").read_text()
    assert written.startswith("# Written by `unite preset digits_tiny`") and "\nbase:" not in written
    assert load_config(tmp_path / "params.yaml") == load_config(repo / "presets" / "digits_tiny.yaml")
    assert "sweep:" in written and "eval:" in written  # every section, for DVC's params dependencies

    again = run_unite(["preset", "digits_tiny"], cwd=tmp_path)
    assert again.returncode == 0 and "holds preset digits_tiny already" in again.stdout, again.stderr
    other = run_unite(["preset", "molecules"], cwd=tmp_path)  # presets build on the embedded default, gone now
    assert_one_line_error(other, "holds preset digits_tiny", "git checkout params.yaml")
    assert load_config(tmp_path / "params.yaml") == load_config(repo / "presets" / "digits_tiny.yaml")
    unknown = run_unite(["preset", "nope"], cwd=tmp_path)
    assert_one_line_error(unknown, "preset 'nope' not found", "digits_tiny, imagenet256_unite_b")


# ----------------------------------------------------------------------------------------------
# unite bench
# ----------------------------------------------------------------------------------------------
def test_bench_lists_the_benchmarks_and_refuses_an_unknown_one(tmp_path):
    from pathlib import Path

    listed = run_unite(["bench"], cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    names = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py"))
    for name in names:
        assert f"  {name}  " in listed.stdout, name
    assert "Training-step throughput" in listed.stdout  # each with its docstring's first line
    wrong = run_unite(["bench", "nosuch"], cwd=tmp_path)
    assert_one_line_error(wrong, "no benchmark 'nosuch'", "train_step")
    assert "not available in this build" not in run_unite(["--help"], cwd=tmp_path).stdout.split("bench")[1][:200]


def test_bench_runs_a_benchmark_and_prints_only_its_json_lines(tmp_path):
    import json

    proc = run_unite(["bench", "attention_cpu", "--threads", "1"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line is JSON
    assert len(rows) == 6 and {r["dtype"] for r in rows} == {"bfloat16", "float32"}
    assert all(r["bench"] == "attention_cpu" and r["threads"] == 1 and r["math_ms"] > 0 for r in rows)
    helped = run_unite(["bench", "attention_cpu", "--help"], cwd=tmp_path)
    assert helped.returncode == 0 and "--threads" in helped.stderr + helped.stdout  # the benchmark's own help


# ----------------------------------------------------------------------------------------------
# Progress: a bar on a terminal, periodic lines with --quiet or without a terminal
# ----------------------------------------------------------------------------------------------
def _run_with_tty_stderr(args, cwd) -> tuple[int, str]:
    """Run `unite ARGS` with stderr on a pseudo-terminal (as in an interactive shell); its exit code
    and what it wrote there."""
    import os
    import pty
    import subprocess

    from tests.ray_fixtures import UNITE, subprocess_env

    master, slave = pty.openpty()
    env = subprocess_env(COLUMNS="120", TERM="xterm")
    proc = subprocess.Popen([UNITE, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_progress_is_a_bar_on_a_terminal_and_lines_with_quiet_or_in_a_log(project):
    code, bar = _run_with_tty_stderr(["classifier"], project)
    assert code == 0, bar[-2000:]
    assert "━" in bar and "classifier" in bar and "eta" in bar  # rich's bar, with its ETA column
    code, quiet = _run_with_tty_stderr(["classifier", "--quiet"], project)
    assert code == 0, quiet[-2000:]
    assert "━" not in quiet and "classifier: 60/60 (100%)" in quiet
    logged = run_unite(["classifier"], cwd=project)  # stderr is a pipe: no terminal
    assert logged.returncode == 0 and "━" not in logged.stderr
    assert "classifier: 60/60 (100%) eta 0:00" in logged.stderr
    prepared = run_unite(["prepare"], cwd=project)
    assert "prepare digits (steps): 3/3 (100%)" in prepared.stderr
