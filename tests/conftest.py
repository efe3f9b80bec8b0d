import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kvlab.threads import pin_threads  # noqa: E402

# One place pins the suite's threads (here and, through OMP_NUM_THREADS, in every notebook kernel and
# sweep worker the tests start): 1 by default, so a second CPU-bound process on the machine slows the
# suite by less than 2x instead of ~10x (spinning torch threads). `KVLAB_THREADS=2 make test` overrides.
THREADS = pin_threads(default=1)


def pytest_report_header(config):
    return f"kvlab: torch threads pinned to {THREADS} (KVLAB_THREADS; also exported as OMP_NUM_THREADS)"


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2 model (converted once to the safetensors cache by `kvlab prepare`)."""
    import kvlab

    return kvlab.load("smollm2-135m", device="cpu")
