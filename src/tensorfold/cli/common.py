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

# choices of the decompose/complete/rank commands (here, below every command module that uses them)
DTYPES = ("float32", "float64")
DEVICES = ("cpu", "cuda")

EXIT_BAD_INPUT = 2
EXIT_UNEXPECTED = 1
EXIT_INTERRUPTED = 130
DEBUG_ENV = "TENSORFOLD_DEBUG"


# --- errors -------------------------------------------------------------------------------------
def report_error(message: str) -> None:
    """Print ``error: <message>`` on stderr as one line of plain text (no rich markup: messages may hold
    brackets); a message of several lines is joined, never cut, so its detail survives."""
    one_line = " ".join(str(message).split()) or "unknown error"
    sys.stderr.write(f"error: {one_line}\n")
    sys.stderr.flush()


def debug_requested(params: dict[str, Any] | None = None) -> bool:
    """True when ``--debug`` was given or ``TENSORFOLD_DEBUG`` is set to a true value."""
    if params and params.get("debug"):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _click_exceptions():
    """click's exception classes as typer raises them (recent typer vendors click as ``typer._click``)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


class TensorfoldGroup(TyperGroup):
    """The top-level command group: catches errors from any command and reports them in one line.

    TensorfoldError -> exit 2 (bad input), KeyboardInterrupt -> exit 130, anything else -> exit 1 with
    a hint to rerun with ``--debug``; ``--debug`` (or TENSORFOLD_DEBUG=1) re-raises with the traceback.
    Typer's own control flow (``--help``, ``typer.Exit``) passes through untouched; usage errors (a
    missing option, ``--budget abc``) become the same one line with exit code 2 instead of click's box.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        click = _click_exceptions()
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            report_error(exc.format_message() + where)
            sys.exit(EXIT_BAD_INPUT)
        except click.ClickException as exc:
            report_error(exc.format_message())
            sys.exit(exc.exit_code)
        except typer.Abort:
            report_error("aborted")
            sys.exit(EXIT_UNEXPECTED)
        sys.exit(code if isinstance(code, int) else 0)

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
        except OSError as exc:  # the machine's state (disk full, permissions), not a bug in tensorfold
            if debug_requested(ctx.params):
                raise
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            report_error(f"{where}{exc.strerror or exc}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
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
    """Refuse an output path that exists (unless ``overwrite``), has the wrong kind, is an input, or
    cannot be written (see :func:`tensorfold.io.check_output`).

    Call it before any work, so a refused run writes nothing. ``kind`` is ``"file"`` or ``"dir"``.
    An input is never replaced, even with ``overwrite``.
    """
    return check_outputs([(path, option, kind)], overwrite=overwrite, inputs=inputs)[0]


def check_outputs(
    outputs: Sequence[tuple[str | os.PathLike | None, str, str]],
    *,
    overwrite: bool,
    inputs: Sequence[str | os.PathLike] = (),
) -> list[Path]:
    """The one output-path rule of every command: ``outputs`` are ``(path, what, kind)`` (``None`` paths
    skipped); no two may be the same file, and each must pass :func:`tensorfold.io.check_output`.

    >>> check_outputs([("r.safetensors", "--out", "file"), ("r.safetensors", "--plot", "file")], overwrite=False)
    Traceback (most recent call last):
    ...
    tensorfold.errors.InvalidArgumentError: --out and --plot both write r.safetensors; give each its own path
    """
    from tensorfold.io import check_output

    seen: dict[Path, str] = {}
    checked = []
    for path, what, _kind in outputs:
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in seen:
            raise InvalidArgumentError(f"{seen[resolved]} and {what} both write {path}; give each its own path")
        seen[resolved] = what
    for path, what, kind in outputs:
        if path is not None:
            checked.append(check_output(path, overwrite=overwrite, kind=kind, option=what, inputs=inputs))
    return checked


def summary_path_for(out: Path, option: str = "--out") -> Path:
    """Where the JSON summary of a result file ``out`` goes (beside it); ``out`` itself may not be .json."""
    if out.name in ("", ".", ".."):
        raise InvalidArgumentError(f"{option} {out} is the working directory or one of its parents; give a file path")
    if out.suffix.lower() == ".json":
        raise InvalidArgumentError(
            f"{option} {out}: give the result path (e.g. .safetensors); the .json summary is written beside it"
        )
    return out.with_suffix(".json")


# --- display ------------------------------------------------------------------------------------
def stdout_console(width: int | None = None):
    """The console for results. Markup and emoji codes are off: printed text holds user strings (paths,
    ``module:factory`` names, layer names) that rich would otherwise eat (``x:factory:`` -> an emoji)."""
    from rich.console import Console

    return Console(highlight=False, markup=False, emoji=False, width=width)


def stderr_console():
    """The console for progress and log lines (markup and emoji off, as :func:`stdout_console`)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, markup=False, emoji=False)


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
    from rich.table import Table
    from rich.text import Text

    # Text objects are never parsed for markup, whatever the console: user strings print as they are
    table = Table(title=Text(title), show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(Text(key), Text(format_value(value)))
    (console or stdout_console()).print(table)


def print_records_table(
    title: str, columns: Sequence[str], records: Iterable[dict[str, Any]], console=None
) -> None:
    """A table with one row per record; ``columns`` are record keys (numbers right-aligned)."""
    from rich.table import Table
    from rich.text import Text

    records = list(records)
    table = Table(title=Text(title), title_justify="left")
    for name in columns:
        numeric = all(isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool) for r in records)
        table.add_column(Text(name), justify="right" if numeric and records else "left")
    for record in records:
        table.add_row(*(Text(format_value(record.get(name))) for name in columns))
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


def decomposition_rows(method: str, source: str, shape, summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """The first rows of a decomposition's summary table (in-memory and out-of-core runs alike)."""
    return [
        ("method", method),
        ("input", f"{source} {tuple(shape)} {summary['input']['dtype']}"),
        ("rank", summary["rank"]),
        ("relative error", summary["relative_error"]),
    ]


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
        *(("warning", w) for w in summary.get("warnings", ())),
    ]
    print_key_value_table(title, rows, console=stdout_console())
