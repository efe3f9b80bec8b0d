"""The repository references only what it contains.

Two checks over the repository's own text files (tracked, plus new files git does not ignore):

* paths: every relative path to a repository file (`docs/design.md`, `kvlab/hooks.py`,
  `notebooks/05_method_comparison.ipynb`, `sweeps/quickstart.yaml`, `docs/gallery/05_pareto.png`,
  a bare `design.md`, a markdown link target) must exist, resolved from the repository root (markdown
  link targets: from the linking file's folder). Generated outputs (figures/, runs/, data/) and
  obvious placeholders (`<notebook>`, `NAME`, `{name}`) are not checked.
* names: every dotted `kvlab.xxx.yyy` name in backticks in README.md, docs/*.md and the docstrings
  of kvlab/, and every `from kvlab.xxx import a, b` in their code examples, must resolve by importing
  the module and getattr.

The scanners are plain functions, unit-tested below on injected bad references.
"""
from __future__ import annotations

import ast
import fnmatch
import importlib
import itertools
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# files whose text is scanned for paths (fnmatch patterns; "**" spans folders)
SCANNED = ("kvlab/*.py", "kvlab/**/*.py", "tests/*.py", "benchmarks/*.py", "notebooks/*.ipynb", "sweeps/*.yaml",
           "README.md", "docs/*.md", "Makefile", ".ci/run")
# files whose backticked `kvlab.x.y` names are resolved (plus the docstrings of kvlab/**/*.py)
NAME_DOCS = ("README.md", "docs/*.md")

# first folder of a path that points into the repository (generated folders are left out on purpose:
# figures/, runs/ and data/ hold outputs and caches that a fresh clone does not have)
REPO_DIRS = ("kvlab", "tests", "notebooks", "sweeps", "benchmarks", "docs", ".ci")
TOP_FILES = ("README.md", "Makefile", "pyproject.toml", "environment.yml")
GENERATED = ("figures/", "runs/", "data/", ".venv/")

# this file quotes bad references on purpose (its own unit tests); it is not scanned
SELF = "tests/test_repo_references.py"

# Paths that name a file which must NOT exist (a test of the error for a missing notebook).
# Keep this list small and commented.
ALLOWED_MISSING = {
    "notebooks/does_not_exist.ipynb",   # tests/test_sweep.py: the sweep must reject a missing notebook
}

_PATH_CHARS = r"[\w\-.*%<>]"
_PATH_RE = re.compile(
    r"(?<![\w./\-$])"                                                  # not the tail of a longer path or URL
    r"((?:" + "|".join(re.escape(d) for d in REPO_DIRS) + r")/(?:" + _PATH_CHARS + r"|/|\{[^{}\s]*\})*"
    r"|(?:" + "|".join(re.escape(f) for f in TOP_FILES) + r")(?![\w.])"
    r"|[\w\-]+\.md(?![\w.]))")                                         # a bare markdown file name (design.md)
_MD_LINK_RE = re.compile(r"\]\(([^)\s]+)\)|<img[^>]*\bsrc=\"([^\"]+)\"")
_TRAILING = ".,:;!?'\"`)]"


# ---------------------------------------------------------------------------------------------- files
def repo_files(root: Path = ROOT) -> list[str]:
    """Tracked files plus untracked files git does not ignore (new files), relative to `root`."""
    try:
        out = []
        for extra in ([], ["--others", "--exclude-standard"]):
            out += subprocess.run(["git", "ls-files", *extra], cwd=root, capture_output=True, text=True,
                                  check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):           # not a git checkout: walk the folders
        out = [str(p.relative_to(root)) for p in root.rglob("*")
               if p.is_file() and not any(part in (".git", ".venv", "__pycache__") for part in p.parts)]
    return sorted({f for f in out if (root / f).is_file()})


def matches(path: str, patterns) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def file_text(path: Path) -> str:
    """A file's text; for a notebook, its cells' sources (one cell after another)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".ipynb":
        nb = json.loads(text)
        return "\n".join("".join(c.get("source", "")) for c in nb.get("cells", []))
    return text


# ---------------------------------------------------------------------------------------------- paths
def _expand_braces(ref: str) -> list[str]:
    """`a.{png,pdf}` -> [`a.png`, `a.pdf`] (shell-style; one level)."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", ref)
    if not m:
        return [ref]
    return [x for alt in m.group(1).split(",") for x in _expand_braces(ref[:m.start()] + alt + ref[m.end():])]


def is_placeholder(ref: str) -> bool:
    """`<notebook>`, `NAME`, `{name}`, `...`, a one-letter name (`notebooks/x.ipynb` as test data):
    a pattern for the reader to fill in, not a file."""
    if any(c in ref for c in "<>") or re.search(r"\{[^{},]*\}", ref) or "..." in ref or "…" in ref:
        return True
    stems = [Path(part).stem for part in ref.split("/") if part and part not in TOP_FILES]
    return any(re.fullmatch(r"[A-Z][A-Z_]*|[a-z]", stem) for stem in stems)


def path_references(text: str, markdown: bool = False) -> list[tuple[int, str, bool]]:
    """(line, path, relative to the file's folder?) for every repository path in `text`."""
    refs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in _PATH_RE.finditer(line):
            ref = m.group(1).rstrip(_TRAILING)
            if ref.endswith("/.") or not ref or ref in REPO_DIRS:
                continue
            refs.append((lineno, ref, False))
        if markdown:
            for m in _MD_LINK_RE.finditer(line):
                target = (m.group(1) or m.group(2)).split("#")[0]
                if target and not re.match(r"[a-z][a-z0-9+.-]*:", target) and not target.startswith("/"):
                    refs.append((lineno, target, True))
    return refs


def resolves(ref: str, base: Path) -> bool:
    """Does `ref` name something in the repository? Globs must match; a suffix-less name may be a
    notebook or module stem (`notebooks/07_explorer`)."""
    for r in _expand_braces(ref):
        p = base / r
        if any(c in r for c in "*?["):
            if not list(base.glob(r)):
                return False
            continue
        if p.exists() or (not p.suffix and any(p.with_suffix(s).exists() for s in (".ipynb", ".py", ".yaml", ".md"))):
            continue
        return False
    return True


def dangling_paths(root: Path = ROOT, files: list[str] | None = None) -> list[str]:
    """`file:line: path` for every repository path that does not exist."""
    files = [f for f in (repo_files(root) if files is None else files) if matches(f, SCANNED) and f != SELF]
    bad = []
    for rel in files:
        src = root / rel
        for lineno, ref, local in path_references(file_text(src), markdown=src.suffix == ".md"):
            if ref.startswith(GENERATED) or ref in ALLOWED_MISSING:
                continue
            if resolves(ref, src.parent if local else root) or is_placeholder(ref):
                continue
            bad.append(f"{rel}:{lineno}: {ref}")
    return bad


# ---------------------------------------------------------------------------------------------- names
_NAME_RE = re.compile(r"(?<![\w.])kvlab(?:\.\w+)+")
_FROM_RE = re.compile(r"^\s*(?:>>>\s*)?from\s+(kvlab(?:\.\w+)*)\s+import\s+\(?([\w \t,]+?)\)?\s*(?:#.*)?$", re.M)


def docstrings(source: str) -> list[str]:
    """Every module, class and function docstring of a Python source."""
    tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append(doc)
    return out


def name_references(text: str) -> list[str]:
    """`kvlab.x.y` names inside backticks, and `kvlab.x.y` for each `from kvlab.x import y` line."""
    fences = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
    code = fences.findall(text)                          # fenced blocks: every kvlab.x.y in them is a name
    spans = [s for s in re.findall(r"`([^`]+)`", fences.sub("", text)) if "\n\n" not in s]
    names = []
    for chunk in (*code, *spans):
        # `kvlab.load(x).model`: the match stops at the call; what follows is an attribute of its result
        names += [m.group(0) for m in _NAME_RE.finditer(chunk)]
    for mod, items in _FROM_RE.findall(text):
        names += [f"{mod}.{item.split(' as ')[0].strip()}" for item in items.split(",") if item.strip()]
    return names


def resolve_name(name: str) -> bool:
    """Import the longest importable module prefix of `name`, then getattr the rest."""
    parts = name.split(".")
    obj, i = None, len(parts)
    while i > 0:
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError as e:
            if e.name is not None and not ".".join(parts[:i]).startswith(e.name):
                raise                                   # the module exists but one of its imports is missing
            i -= 1
    if obj is None:
        return False
    for attr in parts[i:]:
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            return False
    return True


def dangling_names(root: Path = ROOT, files: list[str] | None = None) -> list[str]:
    """`file: name` for every cited `kvlab.x.y` name that does not resolve."""
    files = repo_files(root) if files is None else files
    bad = []
    for rel in files:
        if matches(rel, NAME_DOCS):
            texts = [(root / rel).read_text(encoding="utf-8")]
        elif matches(rel, ("kvlab/*.py", "kvlab/**/*.py")):
            texts = docstrings((root / rel).read_text(encoding="utf-8"))
        else:
            continue
        for name in sorted(set(itertools.chain.from_iterable(name_references(t) for t in texts))):
            if not resolve_name(name):
                bad.append(f"{rel}: {name}")
    return bad


# ---------------------------------------------------------------------------------------------- tests
def test_every_referenced_path_exists():
    bad = dangling_paths()
    assert not bad, "references to files the repository does not contain:\n  " + "\n  ".join(bad)


def test_every_cited_kvlab_name_resolves():
    bad = dangling_names()
    assert not bad, "kvlab names cited in docs/docstrings that do not resolve:\n  " + "\n  ".join(bad)


def test_the_scan_covers_the_documents_it_should():
    files = repo_files()
    for must in ("README.md", "docs/design.md", "kvlab/hooks.py", "Makefile", ".ci/run"):
        assert must in files and matches(must, SCANNED), must
    assert any(f.endswith(".ipynb") and matches(f, SCANNED) for f in files)


def test_path_scanner_catches_injected_bad_references(tmp_path):
    (tmp_path / "docs" / "gallery").mkdir(parents=True)
    (tmp_path / "kvlab").mkdir()
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "docs" / "gallery" / "fig_a.png").write_bytes(b"")
    (tmp_path / "notebooks" / "00_quickstart.ipynb").write_text(json.dumps(
        {"cells": [{"cell_type": "markdown", "source": ["see `sweeps/missing.yaml`"]}]}))
    (tmp_path / "kvlab" / "hooks.py").write_text(
        '"""Interception (design.md section 2); protocols in docs/design.md section 3; kvlab/gone.py.\n\n'
        'Fine: kvlab/hooks.py, notebooks/00_quickstart, figures/00/x.png, sweeps/<notebook>.yaml,\n'
        'sweeps/NAME.yaml, f"notebooks/{name}.ipynb", https://example.org/kvlab/nothing.py."""\n')
    (tmp_path / "README.md").write_text(
        "![](docs/gallery/fig_a.png) ![](docs/gallery/fig_b.png) [x](docs/gallery/fig_a.{png,pdf})\n"
        "`make bench` runs benchmarks/bench_hooks.py; notebooks/0*.ipynb\n")
    files = ["README.md", "kvlab/hooks.py", "notebooks/00_quickstart.ipynb", "docs/gallery/fig_a.png"]
    bad = dangling_paths(tmp_path, files)
    found = sorted(b.split(": ", 1)[1] for b in bad)
    assert found == sorted(["design.md", "docs/design.md", "kvlab/gone.py", "sweeps/missing.yaml",
                            "docs/gallery/fig_b.png", "docs/gallery/fig_b.png",         # the path and the markdown link
                            "docs/gallery/fig_a.{png,pdf}", "docs/gallery/fig_a.{png,pdf}",
                            "benchmarks/bench_hooks.py"]), bad
    # once the files exist, the same text is clean
    for f in ("design.md", "docs/design.md", "kvlab/gone.py", "sweeps/missing.yaml", "docs/gallery/fig_b.png",
              "docs/gallery/fig_a.pdf", "benchmarks/bench_hooks.py"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    assert dangling_paths(tmp_path, files) == []


def test_name_scanner_catches_injected_bad_names(tmp_path):
    (tmp_path / "kvlab").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "kvlab" / "mod.py").write_text(
        '"""Uses `kvlab.quant.parse`, `kvlab.store.Store`, `kvlab.evaluate` and `kvlab.nosuch_module`."""\n'
        'def f():\n    """Returns `kvlab.quant.registry.no_such_function(...)`; `kvlab.load(x).model` is fine."""\n')
    (tmp_path / "docs" / "design.md").write_text(
        "`kvlab.hooks.Session` and `kvlab.kvcache.make_cache(model, session)`; a span over\ntwo lines: `kvlab "
        "results --where\n'x'` before `kvlab.store.nosuch`\n\n"
        "```python\nfrom kvlab.choice import evaluate_choice, no_such_name\nkvlab.tasks.nosuch(lm).x\n```\n")
    bad = dangling_names(tmp_path, ["kvlab/mod.py", "docs/design.md"])
    assert sorted(b.split(": ", 1)[1] for b in bad) == [
        "kvlab.choice.no_such_name", "kvlab.kvcache.make_cache", "kvlab.nosuch_module",
        "kvlab.quant.registry.no_such_function", "kvlab.store.nosuch", "kvlab.tasks.nosuch"], bad


@pytest.mark.parametrize("ref", ["sweeps/<notebook>.yaml", "sweeps/NAME.yaml", "notebooks/{name}.ipynb",
                                 "long/.../y.py", "notebooks/x.ipynb"])
def test_placeholders_are_not_files(ref):
    assert is_placeholder(ref)


@pytest.mark.parametrize("ref", ["docs/design.md", "sweeps/smoke.yaml", "README.md", "kvlab/quant/methods/kivi.py",
                                 "notebooks/05_x.ipynb", "docs/gallery/fig_a.{png,pdf}"])
def test_real_paths_are_not_placeholders(ref):
    assert not is_placeholder(ref)
