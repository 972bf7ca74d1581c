"""The `unite` command line as a user meets it: help with defaults, one-line errors with exit codes,
`unite sample` writing a grid. Every call is a real subprocess (exit codes and stderr as a shell sees them)."""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipelines.cli import OPTIONAL_COMMANDS
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
    for name in ("prepare", "train", "sample", "ui", *OPTIONAL_COMMANDS):
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


def test_a_command_missing_from_this_build_exits_2(tmp_path):
    missing = [n for n in OPTIONAL_COMMANDS
               if importlib.util.find_spec(f"pipelines.commands.{n}") is None
               and importlib.util.find_spec(f"pipelines.stages.{n}") is None]
    if not missing:
        pytest.skip("every optional command is in this build")
    proc = run_unite([missing[0], "--some-option"], cwd=tmp_path)
    assert_one_line_error(proc, f"`unite {missing[0]}` is not available in this build", code=2)


def test_sample_writes_a_grid_of_the_requested_classes(project):
    from PIL import Image

    proc = run_unite(["sample", "--classes", "0,1,2", "--per-class", "4", "--cfg-scale", "3", "--out",
                      "grid.png"], cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 12 samples" in proc.stdout
    with Image.open(project / "grid.png") as img:
        # 3 rows x 4 columns of 8x8 tiles with 2-pixel gaps, upscaled 8x for viewing
        assert img.size == ((4 * 10 + 2) * 8, (3 * 10 + 2) * 8)
        assert img.mode == "L" and len(set(img.getdata())) > 2
