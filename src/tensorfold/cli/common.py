"""Helpers shared by every ``tensorfold`` command: error handling, tables, progress, output paths.

Commands raise tensorfold exceptions; :class:`TensorfoldGroup` turns them into one line on stderr
and an exit code, so no command needs its own ``try``/``except``. Nothing here imports torch.

>>> parse_rank("8,4,4")
(8, 4, 4)
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from tensorfold.errors import InvalidArgumentError, RankError, TensorfoldError

EXIT_BAD_INPUT = 2
EXIT_UNEXPECTED = 1
EXIT_INTERRUPTED = 130
DEBUG_ENV = "TENSORFOLD_DEBUG"


# --- errors -------------------------------------------------------------------------------------
def report_error(message: str) -> None:
    """Print ``error: <message>`` on stderr as plain text (no rich markup: messages may hold brackets)."""
    first_line = " ".join(str(message).split()) or "unknown error"
    sys.stderr.write(f"error: {first_line}\n")
    sys.stderr.flush()


def debug_requested(params: dict[str, Any] | None = None) -> bool:
    """True when ``--debug`` was given or ``TENSORFOLD_DEBUG`` is set to a true value."""
    if params and params.get("debug"):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


class TensorfoldGroup(TyperGroup):
    """The top-level command group: catches errors from any command and reports them in one line.

    TensorfoldError -> exit 2 (bad input), KeyboardInterrupt -> exit 130, anything else -> exit 1 with
    a hint to rerun with ``--debug``; ``--debug`` (or TENSORFOLD_DEBUG=1) re-raises with the traceback.
    Typer's own control flow (usage errors, ``--help``, ``typer.Exit``) passes through untouched.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except TensorfoldError as exc:
            if debug_requested(ctx.params):
                raise
            report_error(str(exc))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            if debug_requested(ctx.params):
                traceback.print_exc()
            report_error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if debug_requested(ctx.params):
                raise
            report_error(
                f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback; "
                "please report it if the input looks valid)"
            )
            raise typer.Exit(EXIT_UNEXPECTED) from None


# --- parsing ------------------------------------------------------------------------------------
def parse_rank(text: str | None, option: str = "--rank") -> int | tuple[int, ...] | None:
    """``"5"`` -> 5, ``"8,4,4"`` -> (8, 4, 4), ``None`` -> None; every rank must be a positive integer."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise RankError(f"{option} must be an integer or a comma-separated list of integers, got {text!r}") from None
    bad = [v for v in values if v <= 0]
    if bad:
        raise RankError(f"{option} must be positive, got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def check_option_choice(value: str, option: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    if value not in choices:
        raise InvalidArgumentError(f"{option} must be one of {', '.join(choices)}; got {value!r}")
    return value


# --- files --------------------------------------------------------------------------------------
def check_output_path(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Sequence[str | os.PathLike] = (),
    kind: str = "file",
    option: str = "--out",
) -> Path:
    """Refuse an output path that exists (unless ``overwrite``), has the wrong kind, or is an input.

    Call it before any work, so a refused run writes nothing. ``kind`` is ``"file"`` or ``"dir"``.
    An input is never replaced, even with ``overwrite``.
    """
    path = Path(path)
    resolved = path.resolve()
    for source in inputs:
        if Path(source).resolve() == resolved:
            raise InvalidArgumentError(f"{option} {path} is the input file; choose another output path")
    if path.exists():
        if kind == "file" and path.is_dir():
            raise InvalidArgumentError(f"{option} {path} is a directory; give a file path")
        if kind == "dir" and not path.is_dir():
            raise InvalidArgumentError(f"{option} {path} is a file; give a directory path")
        if not overwrite:
            raise InvalidArgumentError(f"{option} {path} already exists; pass --overwrite to replace it")
    return path


# --- display ------------------------------------------------------------------------------------
def stdout_console():
    from rich.console import Console

    return Console(highlight=False)


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def format_value(value: Any) -> str:
    """Human-readable text for a table cell: short floats, thousands separators, lists as tuples."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0 or math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) < 1e-3 or abs(value) >= 1e5:
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(format_value(v) for v in value) + ")"
    return str(value)


def print_key_value_table(title: str, rows: Iterable[tuple[str, Any]], console=None) -> None:
    """A two-column table (field, value) on stdout."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(escape(key), escape(format_value(value)))
    (console or stdout_console()).print(table)


def print_records_table(
    title: str, columns: Sequence[str], records: Iterable[dict[str, Any]], console=None
) -> None:
    """A table with one row per record; ``columns`` are record keys (numbers right-aligned)."""
    from rich.markup import escape
    from rich.table import Table

    records = list(records)
    table = Table(title=title, title_justify="left")
    for name in columns:
        numeric = all(isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool) for r in records)
        table.add_column(escape(name), justify="right" if numeric and records else "left")
    for record in records:
        table.add_row(*(escape(format_value(record.get(name))) for name in columns))
    (console or stdout_console()).print(table)


@contextlib.contextmanager
def fit_progress(description: str, total: int | None = None) -> Iterator[Callable[[int, float], None]]:
    """Yield ``callback(iteration, fit)`` that drives a progress bar on stderr.

    The bar is shown only when stderr is a terminal, so logs and pipes stay clean.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = stderr_console()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("iteration {task.completed:.0f}{task.fields[limit]}  fit {task.fields[fit]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with progress:
        task = progress.add_task(description, total=total, fit="-", limit=f"/{total}" if total else "")

        def callback(iteration: int, fit: float | None = None) -> None:
            fit_text = "-" if fit is None else f"{float(fit):.6f}"
            progress.update(task, completed=int(iteration), fit=fit_text)

        yield callback


def publish_result(
    result,
    summary: dict[str, Any],
    *,
    out: Path,
    summary_path: Path,
    started: float,
    as_json: bool,
    title: str,
    first_rows: Sequence[tuple[str, Any]],
) -> None:
    """Save a decomposition and its JSON summary (each atomically), then print the summary.

    ``first_rows`` (method, input, rank, error) head the table; the size, iteration and timing rows
    that every decomposition shares follow.
    """
    import json
    import time

    from tensorfold.io import write_text_atomic

    result.save(out)
    summary["total_seconds"] = time.perf_counter() - started
    write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    rows = [
        *first_rows,
        ("parameters", summary["n_params"]),
        ("compression", f"{summary['compression_ratio']:.3g}x"),
        ("iterations", summary["iterations"]),
        ("converged", summary["converged"]),
        ("seconds", summary["seconds"]),
        ("dtype / device", f"{summary['dtype']} / {summary['device']}"),
        ("saved", f"{out} (summary: {summary_path})"),
    ]
    print_key_value_table(title, rows, console=stdout_console())
