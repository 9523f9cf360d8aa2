"""The README stays true: its Python and command-line blocks run, in order, in a fresh directory, and what
they print matches the ``text`` block that follows them.

Rules (also written in docs/testing.md):
- a ```python block runs in one namespace shared by all the README's Python blocks; a block whose first
  line is ``# NAME.py`` is written to that file instead (a user module the next blocks import);
- a ```bash block runs each ``tensorfold ...`` line through the real CLI (in-process); any other command
  needs ``<!-- readme-test: skip -->`` on the line before the block;
- a ```text block right after a run block is its expected output: lines compare token by token, numbers
  with tolerance (integers exactly; decimals to half a unit of their last printed digit, or 2%), table
  borders and spacing ignored, and a line ``...`` stands for any number of lines.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = "<!-- readme-test: skip -->"
BORDER = re.compile(r"[│┃┌┐└┘├┤┬┴┼─━┏┓┗┛┡┩╇╈┳┻╋┠┨╭╮╯╰|]+")
NUMBER = re.compile(r"^([-+]?(?:\d[\d,]*)?\.?\d+(?:[eE][-+]?\d+)?)(.*)$")


def parse_blocks(text: str) -> list[dict]:
    """Fenced blocks in order: ``{"lang", "body", "skip", "line"}``."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        start, i = i, i + 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        blocks.append({"lang": m.group(1), "body": "\n".join(body), "skip": before == SKIP, "line": start + 1,
                       "end": i, "follows": None})
        i += 1
    # a text block directly after a run block (only blank lines between) is that block's expected output
    for prev, block in zip(blocks, blocks[1:]):
        gap = lines[prev["end"] + 1: block["line"] - 1]
        if block["lang"] == "text" and all(not g.strip() for g in gap):
            block["follows"] = prev
    return blocks


def tokens(line: str) -> list[str]:
    return [t for t in BORDER.sub(" ", line).split() if t]


def same_token(expected: str, actual: str) -> bool:
    if expected == actual:
        return True
    me, ma = NUMBER.match(expected), NUMBER.match(actual)
    if not me or not ma or me.group(2) != ma.group(2):
        return False
    e_text, a_text = me.group(1).replace(",", ""), ma.group(1).replace(",", "")
    e, a = float(e_text), float(a_text)
    if re.fullmatch(r"[-+]?\d+", e_text):
        return e == a  # counts are exact
    mantissa = e_text.lower().split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    exponent = int(e_text.lower().split("e")[1]) if "e" in e_text.lower() else 0
    half_unit = 0.5 * 10.0 ** (exponent - decimals)
    return math.isclose(e, a, rel_tol=0.02, abs_tol=half_unit * 1.0001)


def same_line(expected: str, actual: str) -> bool:
    e, a = tokens(expected), tokens(actual)
    return len(e) == len(a) and all(same_token(x, y) for x, y in zip(e, a))


def matches(expected: list[str], actual: list[str]) -> bool:
    """``expected`` lines (``...`` = any number of lines) against ``actual``, blank lines ignored."""
    expected = [e for e in expected if e.strip()]
    actual = [a for a in actual if a.strip()]

    def go(i: int, j: int) -> bool:
        if i == len(expected):
            return j == len(actual)
        if tokens(expected[i]) == ["..."]:
            return any(go(i + 1, k) for k in range(j, len(actual) + 1))
        return j < len(actual) and same_line(expected[i], actual[j]) and go(i + 1, j + 1)

    return go(0, 0)


def run_bash(body: str) -> str:
    from typer.testing import CliRunner

    from tensorfold.cli.main import app

    out = []
    for raw in body.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        args = shlex.split(line)
        assert args[0] == "tensorfold", f"README command {line!r} is not a tensorfold command; mark the block skip"
        res = CliRunner().invoke(app, args[1:], env={"TENSORFOLD_DEBUG": None, "COLUMNS": "100"})
        assert res.exit_code == 0, f"{line}\n{res.output}"
        out.append(res.stdout)
    return "".join(out)


def test_readme_blocks_run_and_print_what_the_readme_shows(tmp_path, monkeypatch):
    import sys

    blocks = parse_blocks(README.read_text())
    assert sum(b["lang"] == "python" for b in blocks) >= 2
    assert sum(bool(b["lang"] == "text" and b["follows"]) for b in blocks) >= 2
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python script.py` / the CLI see modules beside them
    namespace: dict = {"__name__": "__readme__"}
    outputs: dict[int, str] = {}
    try:
        for block in blocks:
            if block["skip"] or block["lang"] not in ("python", "bash"):
                continue
            first = block["body"].lstrip().splitlines()[0] if block["body"].strip() else ""
            if block["lang"] == "python" and re.fullmatch(r"# [\w/]+\.py", first):
                (tmp_path / first[2:]).write_text(block["body"])
                continue
            if block["lang"] == "python":
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    exec(compile(block["body"], f"README.md:{block['line']}", "exec"), namespace)
                outputs[block["line"]] = buf.getvalue()
            else:
                outputs[block["line"]] = run_bash(block["body"])
        for block in blocks:
            prev = block["follows"]
            if prev is None or prev["line"] not in outputs:
                continue
            actual = outputs[prev["line"]].splitlines()
            expected = block["body"].splitlines()
            assert matches(expected, actual), (
                f"README.md line {block['line']}: the output of the block at line {prev['line']} differs.\n"
                "--- README shows:\n" + block["body"] + "\n--- it prints:\n" + outputs[prev["line"]])
    finally:
        for name in [m for m in sys.modules if m in ("mymodels",)]:
            del sys.modules[name]


@pytest.mark.parametrize("expected, actual, ok", [
    ("error 0.0099 sweeps 8", "error 0.0099 sweeps 8", True),
    ("error 0.0099 sweeps 8", "error 0.01 sweeps 8", True),
    ("error 0.0099 sweeps 8", "error 0.0099 sweeps 7", False),
    ("│ compression │ 82.8x │", "| compression | 82.81x |", True),
    ("│ compression │ 82.8x │", "│ compression │ 85.1x │", False),
    ("parameters 725", "parameters 726", False),
    ("rank (5, 5, 5)", "rank (5, 5, 6)", False),
])
def test_line_comparison_has_tolerance_only_for_decimals(expected, actual, ok):
    assert same_line(expected, actual) is ok


def test_ellipsis_line_stands_for_any_lines():
    assert matches(["a 1", "...", "z 2"], ["a 1", "b", "c", "z 2"])
    assert matches(["a 1", "...", "z 2"], ["a 1", "z 2"])
    assert not matches(["a 1", "z 2"], ["a 1", "b", "z 2"])
