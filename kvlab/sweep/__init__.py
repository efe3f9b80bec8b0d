"""Sweeps: expand a YAML grid of notebook parameters and run each config with papermill.

    # sweeps/02_sensitivity.yaml
    name: sensitivity                       # optional; default: the file name
    notebook: notebooks/02_sensitivity.ipynb
    parameters: {model: smollm2-135m}       # fixed values
    grid: {bits: [2, 3, 4], kind: [k, v]}   # product of lists
    zip: {method: [int2, int4], label: [a, b]}   # lists taken together (same length); a list of
                                                 # such dicts makes several zipped groups

    timeout: 1800                           # optional: seconds one cell may run (papermill), else failed

    kvlab sweep sweeps/02_sensitivity.yaml [--workers N] [--devices cuda:0,cuda:1] [--backend local|ray]
                [--store PATH] [--runs-dir DIR] [--timeout SECONDS] [--dry-run] [--force]

Every config is validated before anything runs (and by `--dry-run`): the notebook exists, every
parameter is assigned in its cell tagged `parameters`, every value has the type of that parameter's
default there (`kvlab.notebook.parameter_types`: an int default takes an int, a float default an int
or a float, a list default a list, a None default anything), and every `method` / `methods` spec
parses (`kvlab.quant.parse`).
A config is identified by the sha256 of (notebook path, parameters); configs already recorded ok in
the store's `runs` table are skipped, so a re-run of a finished sweep computes nothing. The rest run
with papermill (kernel `python3`, cwd = repo root); executed notebooks go to
`runs/<sweep name>/<config hash>.ipynb`. `store_path` and `device` are passed to the notebook only
when its parameters cell declares them ($KVLAB_STORE is set for the kernel either way).

Local backend: N CPU worker processes, or one worker per device of `--devices`. The notebooks
write results into the store themselves; the driver writes the `runs` table (ok, or failed with
the traceback) and goes on after a failure. A cell that runs longer than the timeout (`--timeout`,
else the YAML's `timeout`, else none) is interrupted and its config recorded as failed, so a hung
kernel cannot stall a sweep. Each worker's kernels get `OMP_NUM_THREADS` = the machine's cores
divided among the workers (or `$KVLAB_THREADS`), so workers never fight over cores. Ray backend:
one `ray.remote` task per config (num_gpus=1 for CUDA devices, else num_cpus=1); the task passes a
temporary store file to its notebook explicitly (parameter `store_path`, and `$KVLAB_STORE`) and
returns that store's rows; the driver alone writes the real store.

The package, one job per file: `spec.py` (YAML, expansion, validation), `execute.py` (one config
with papermill), `local.py` (worker processes), `ray_backend.py` (Ray tasks), `driver.py`
(`run_sweep`: skip what is done, run the rest, record every config). The command line is
`kvlab sweep` (`kvlab/cli.py`).
"""
from __future__ import annotations

from .driver import run_sweep
from .spec import config_hash, expand, load_spec, notebook_parameter_types, notebook_parameters

__all__ = ["expand", "load_spec", "run_sweep", "config_hash", "notebook_parameters", "notebook_parameter_types"]
