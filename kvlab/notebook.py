"""Helpers for parameterized notebooks: reject a wrong parameter name or type in the first cell,
and run a notebook with papermill quietly (no kernel TCP warning) while echoing what it prints.

The expected type of a parameter is inferred from its default in the cell tagged `parameters`
(`parameter_types`): an int default takes an int, a float default an int or a float, a list default a
list, a str default a str, a bool default only a bool, and a None default anything. `kvlab sweep
--dry-run` checks every config with the same function before anything runs; a notebook can check
what papermill injected with `check_parameters_cell(globals(), _before)`.

This module is the first thing every notebook imports: it must stay light (no torch, no pandas).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import IO, Any, Mapping

from .errors import KVLabError

__all__ = ["names_before", "check_parameters", "check_parameters_cell", "parameter_types", "type_mismatch",
           "describe_type", "quiet_kernel_manager", "execute"]

_LITERAL_TYPES: tuple[type, ...] = (bool, int, float, str, list, dict, tuple)


def names_before() -> set[str]:
    """Call in the cell before the `parameters` cell: the names that exist before any parameter."""
    import __main__

    return set(vars(__main__))


# ---------------------------------------------------------------------------------------------
# expected types: inferred once, checked the same way by notebooks and by `kvlab sweep`
# ---------------------------------------------------------------------------------------------
def _strip_magics(source: str) -> str:
    """The cell's source with IPython magic / shell lines (`%...`, `!...`) blanked, so `ast` can parse it."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def parameter_types(source: str) -> dict[str, type | tuple[type, ...] | None]:
    """Expected type of each name assigned in a `parameters` cell, inferred from its default value.

    int -> int, float -> float (ints accepted), bool -> bool, str -> str, list -> list, dict -> dict,
    tuple -> tuple or list; a None default, a default that is not a literal (`2 ** 10`, a call) and
    names bound by unpacking map to None: anything is accepted. The last assignment of a name wins.
    """
    try:
        tree = ast.parse(_strip_magics(source))
    except SyntaxError as e:
        raise KVLabError(f"the parameters cell is not valid Python: {e}; fix the cell so it parses") from None
    types: dict[str, type | tuple[type, ...] | None] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        elif isinstance(node, ast.AugAssign):        # `x += 1` keeps what `x = ...` said about x
            for name in _bound_names(node.target):
                types.setdefault(name, None)
            continue
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                types[target.id] = _type_of_default(value)
            else:
                for name in _bound_names(target):
                    types[name] = None
    return types


def _bound_names(target: ast.expr) -> list[str]:
    """Names bound by an unpacking target (`a, (b, *c) = ...`)."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for elt in target.elts for n in _bound_names(elt)]
    if isinstance(target, ast.Starred):
        return _bound_names(target.value)
    return []


def _type_of_default(value: ast.expr | None) -> type | tuple[type, ...] | None:
    """The expected type for a default expression (None: accept anything)."""
    if value is None:
        return None
    try:
        default = ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None                      # not a literal: nothing to infer
    if default is None or type(default) not in _LITERAL_TYPES:
        return None
    if isinstance(default, tuple):
        return (tuple, list)             # YAML and JSON have no tuples
    return type(default)


def describe_type(expected: type | tuple[type, ...] | None) -> str:
    """'int', 'float', 'None or str', 'anything' — how errors name an expected type."""
    if expected is None:
        return "anything"
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join("None" if t is type(None) else t.__name__ for t in types)


def type_mismatch(value: Any, expected: type | tuple[type, ...] | None) -> bool:
    """True when `value` does not fit `expected` (None: anything fits).

    A bool fits only where bool is expected; an int also fits where float is expected.
    """
    if expected is None:
        return False
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):
        return bool not in types
    if float in types and isinstance(value, int):
        return False
    return not isinstance(value, types)


def check_parameters(namespace: dict, before: set[str], **expected: type | tuple | None) -> None:
    """Raise naming the parameter when papermill injected an unknown name or a value of the wrong type.

    `expected` maps each declared parameter to its type, a tuple of types (`(type(None), int)`
    allows None) or None (anything); `parameter_types(source)` infers them from the parameters cell,
    and `check_parameters_cell` does both.
    """
    injected = {k for k in namespace if k not in before and not k.startswith("_")}
    unknown = sorted(k for k in injected - set(expected) if not callable(namespace[k]) and not _is_module(namespace[k]))
    if unknown:
        raise KVLabError(f"unknown notebook parameter(s) {unknown}; this notebook takes: {', '.join(expected)}")
    for name, typ in expected.items():
        if name not in namespace:
            raise KVLabError(f"parameter '{name}' is missing from the parameters cell")
        value = namespace[name]
        if type_mismatch(value, typ):
            raise KVLabError(f"parameter '{name}' must be {describe_type(typ)}, got {type(value).__name__} {value!r}")


def check_parameters_cell(namespace: dict, before: set[str]) -> None:
    """`check_parameters` with the types inferred from the `parameters` cell's own defaults.

    Call it in the cell after the parameters cell (`namespace` = `globals()`, `before` = what
    `names_before()` returned in the cell before it). The parameters cell is found in IPython's
    input history as the cell run right after the last `names_before()` cell, so run the cells in
    order (papermill does).
    """
    check_parameters(namespace, before, **parameter_types(_parameters_cell_from_history(namespace)))


def _parameters_cell_from_history(namespace: Mapping[str, Any]) -> str:
    """The source of the cell run right after the last cell that called `names_before()`."""
    history = namespace.get("_ih") or namespace.get("In")
    if not isinstance(history, list):
        raise KVLabError("check_parameters_cell needs IPython's input history (`_ih`): call it in a notebook, "
                         "or use check_parameters(globals(), _before, name=type, ...) elsewhere")
    for i in range(len(history) - 2, -1, -1):
        if "names_before(" in history[i]:
            return history[i + 1]
    raise KVLabError("check_parameters_cell: no cell calling kvlab.notebook.names_before() ran before this one; "
                     "run the cell `_before = _nb.names_before()` and then the parameters cell first")


def _is_module(x: Any) -> bool:
    import types

    return isinstance(x, types.ModuleType)


# ---------------------------------------------------------------------------------------------
# running a notebook: a kernel without the harmless TCP warning, its prints echoed
# ---------------------------------------------------------------------------------------------
#: ipykernel logs this (logger `IPKernelApp`) whenever its kernel manager uses TCP on localhost,
#: which papermill's always does; it is harmless there and is the only line kvlab drops.
TCP_WARNING = "Kernel is running over TCP without encryption"

# What `python -m ipykernel_launcher` does, with a logging filter dropping exactly TCP_WARNING.
_KERNEL_LAUNCHER = (
    "import logging, sys\n"
    "from pathlib import Path\n"
    "class _DropTcpWarning(logging.Filter):\n"
    "    def filter(self, record):\n"
    "        return not str(record.msg).startswith(%r)\n"
    "logging.getLogger('IPKernelApp').addFilter(_DropTcpWarning())\n"
    "if sys.path and (sys.path[0] == '' or Path(sys.path[0]) == Path.cwd()):\n"
    "    del sys.path[0]\n"
    "from ipykernel import kernelapp\n"
    "kernelapp.launch_new_instance()\n") % TCP_WARNING


def quiet_kernel_cmd(cmd: list[str]) -> list[str]:
    """A kernel command line with `-m ipykernel_launcher` replaced by the same launch plus a filter
    for TCP_WARNING; any other command (another kernel, a custom launcher) is returned unchanged."""
    for i in range(len(cmd) - 1):
        if cmd[i] == "-m" and cmd[i + 1] == "ipykernel_launcher":
            return [*cmd[:i], "-c", _KERNEL_LAUNCHER, *cmd[i + 2:]]
    return list(cmd)


_QUIET_KM: list[type] = []


def quiet_kernel_manager() -> type:
    """nbclient's default kernel manager class, launching ipykernel without its TCP warning.

    Pass it to papermill: `pm.execute_notebook(..., kernel_manager_class=quiet_kernel_manager())`.
    """
    if not _QUIET_KM:
        from jupyter_client import AsyncKernelManager

        class QuietKernelManager(AsyncKernelManager):
            """AsyncKernelManager whose ipykernel does not log the localhost TCP warning."""

            def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
                return quiet_kernel_cmd(super().format_kernel_cmd(extra_arguments))

        _QUIET_KM.append(QuietKernelManager)
    return _QUIET_KM[0]


class _Echo:
    """A text stream that writes what a notebook prints to `out`, each line indented (papermill's
    `stdout_file`)."""

    def __init__(self, out: IO[str], indent: str = "  ") -> None:
        self.out, self.indent, self._at_line_start = out, indent, True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self._at_line_start and piece.strip():
                self.out.write(self.indent)
            self.out.write(piece)
            self._at_line_start = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def execute(notebook: str | Path, output: str | Path, parameters: Mapping[str, Any] | None = None, *,
            cwd: str | Path | None = None, echo: IO[str] | None = None, timeout: float | None = None) -> None:
    """Run a notebook with papermill (kernel `python3`, no progress bar, no TCP warning).

    `echo`: a stream (e.g. `sys.stdout`) that receives what the notebook prints to stdout while it
    runs, one indented line per printed line; tables and figures stay in `output` only.
    A failing cell raises papermill's `PapermillExecutionError` (the executed notebook is written).
    """
    import papermill as pm

    Path(output).parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(notebook), str(output), parameters=dict(parameters or {}), kernel_name="python3",
                        cwd=None if cwd is None else str(cwd), progress_bar=False, log_output=False,
                        stdout_file=_Echo(echo) if echo is not None else None, execution_timeout=timeout,
                        kernel_manager_class=quiet_kernel_manager())
