import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2 model (converted once to the safetensors cache by `kvlab prepare`)."""
    import kvlab

    return kvlab.load("smollm2-135m", device="cpu")
