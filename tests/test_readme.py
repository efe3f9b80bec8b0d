"""The README cannot drift from the code: its Python blocks run, its `kvlab ...` command lines parse.

The Python blocks are run in order, in one namespace, as a reader would paste them, on a tiny random
model with small sizes: each substitution below swaps an embedded-model size for a small one, and a
substitution that no longer matches anything fails the test (the README changed: update the table).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"

# (README text, what the test runs instead): sizes only, never the calls themselves
SMALL = [
    ('kvlab.load("smollm2-135m")', 'kvlab.tiny("llama", num_hidden_layers=4)'),
    ("n_tokens=1024, window=1024", "n_tokens=128, window=128"),
    ("ids[:, :512]", "ids[:, :64]"),
    ("ids[:, 512:]", "ids[:, 64:]"),
    ("n_tokens=2048, window=512", "n_tokens=256, window=64"),
    ("n=100", "n=3"),
    ("n=50", "n=2"),
    ("n=40", "n=2"),
]


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_the_documented_blocks():
    assert len(blocks("python")) >= 4 and len(blocks("bash")) >= 2


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_STORE", str(tmp_path / "results.sqlite"))
    monkeypatch.setenv("KVLAB_REFERENCE_CACHE", "0")
    monkeypatch.chdir(tmp_path)


def test_python_blocks_run_on_a_tiny_model(isolated):
    code = blocks("python")
    used = set()
    small = []
    for block in code:
        for old, new in SMALL:
            if old in block:
                used.add(old)
                block = block.replace(old, new)
        small.append(block)
    unused = [old for old, _ in SMALL if old not in used]
    assert not unused, f"README no longer contains {unused}: update SMALL in tests/test_readme.py"
    namespace: dict = {"__name__": "__readme__"}
    torch.manual_seed(0)
    for i, block in enumerate(small, 1):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as exc:  # name the block so the README line is easy to find
            raise AssertionError(f"README python block {i} failed: {type(exc).__name__}: {exc}\n{block}") from exc


def _command_lines() -> list[list[str]]:
    lines = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("kvlab "):
                lines.append(shlex.split(line)[1:])
    return lines


def test_kvlab_command_lines_parse():
    """Every `kvlab ...` line of the README's shell blocks names a real subcommand and real flags."""
    from kvlab.cli import build_parser

    lines = _command_lines()
    assert lines, "no `kvlab ...` command lines found in the README's bash blocks"
    parser = build_parser()
    for argv in lines:
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"README command `kvlab {' '.join(argv)}` does not parse") from exc
