"""`unite bench`: run one of the project's benchmarks (benchmarks/*.py) and print its JSON lines.

    unite bench                               list the benchmarks (name and what each measures)
    unite bench train_step --cases default    run benchmarks/train_step.py with those options
    unite bench short_run --help              the benchmark's own options

The benchmark runs as `python benchmarks/<name>.py [options]` with this interpreter, from the
project folder that holds benchmarks/ (the current directory, else this package's checkout). Its
JSON lines go to stdout as they come (`unite bench eval_10k > eval.jsonl` keeps a clean JSON-lines
file); any other line it prints, and its logs, go to stderr. The exit code is the benchmark's.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from . import console, err_console, project_root


class BenchError(RuntimeError):
    """No benchmarks folder, or no benchmark of that name; the message lists what there is."""


def benchmarks_dir() -> Path | None:
    """benchmarks/ of the current project, else of the checkout this package is installed from."""
    for root in (project_root(), Path(__file__).resolve().parents[2]):
        folder = root / "benchmarks"
        if folder.is_dir() and any(folder.glob("*.py")):
            return folder
    return None


def available(folder: Path) -> dict[str, str]:
    """name -> first line of the module docstring, for every benchmarks/<name>.py (read, not imported)."""
    found = {}
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        except (OSError, SyntaxError, ValueError):
            doc = ""
        found[path.stem] = (doc.strip().splitlines() or [""])[0]
    return found


def _is_json(line: str) -> bool:
    text = line.strip()
    if not text.startswith(("{", "[")):
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def run_benchmark(script: Path, args: list[str]) -> int:
    """Run the script; JSON lines of its stdout to our stdout, its other lines to stderr; its exit code."""
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=script.parent.parent, stdout=subprocess.PIPE,
                            stderr=None, text=True, bufsize=1)
    try:
        assert proc.stdout is not None
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


def register(app: typer.Typer) -> None:
    @app.command("bench", add_help_option=False,
                 context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def bench(
        name: Annotated[Optional[str], typer.Argument(help="benchmark to run (none: list them)",
                                                      show_default=False)] = None,
        args: Annotated[Optional[List[str]], typer.Argument(help="options passed to the benchmark",
                                                            show_default=False)] = None,
    ) -> None:
        """Run a benchmark (benchmarks/NAME.py) and print its JSON lines; no NAME lists them."""
        folder = benchmarks_dir()
        if folder is None:
            raise BenchError("no benchmarks/ folder here or in this package's checkout: run `unite bench` from "
                             "the project folder")
        found = available(folder)
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
        extra = [a for a in (args or []) if a != "--debug"]  # --debug is unite's own flag
        code = run_benchmark(folder / f"{name}.py", extra)
        if code != 0:
            err_console().print(f"error: benchmark {name} exited with code {code} (its messages are above)",
                                markup=False)
            raise typer.Exit(code)
