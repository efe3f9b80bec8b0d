"""NaN/inf diagnostics name the layer and the tensor where the non-finite value appeared.

The check sums every stored K/V chunk (and every method output) on the device and looks at the
sums once per forward; the label of each sum must travel with it. Injected at every layer, in K and
in V, in both protocols, and in the prefill as well as the later calls of prefill-decode.
"""
import pytest
import torch

from kvlab import KVLabError, models
from kvlab.hooks import quantize

N_LAYERS = 4


def _ids(t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (1, t), generator=torch.Generator().manual_seed(seed))


def _poison(module: torch.nn.Module, armed: dict) -> torch.utils.hooks.RemovableHandle:
    """A forward hook that puts a NaN into the projection's output while armed["on"] is true."""
    def hook(mod, inputs, out):
        if not armed["on"]:
            return None
        out = out.clone()
        out[..., -1, 0] = float("nan")
        return out
    return module.register_forward_hook(hook)


@pytest.fixture(scope="module")
def deep():
    return models.tiny("llama", num_hidden_layers=N_LAYERS).model


@torch.no_grad()
@pytest.mark.parametrize("protocol,when", [("fake", "prefill"), ("prefill-decode", "prefill"),
                                           ("prefill-decode", "continuation"), ("prefill-decode", "third call")])
@pytest.mark.parametrize("kind", ["k", "v"])
def test_nan_names_layer_and_tensor(deep, protocol, when, kind):
    tensor = "keys" if kind == "k" else "values"
    for layer in range(N_LAYERS):
        attn = deep.model.layers[layer].self_attn
        armed = {"on": when == "prefill"}
        handle = _poison(attn.k_proj if kind == "k" else attn.v_proj, armed)
        try:
            with pytest.raises(KVLabError) as err:
                with quantize(deep, "int4", protocol=protocol):
                    out = deep(_ids(24), use_cache=True)
                    if when == "third call":       # a clean continuation first, so earlier labels exist
                        out = deep(_ids(4, 1), past_key_values=out.past_key_values, use_cache=True)
                    armed["on"] = True
                    deep(_ids(8, 2), past_key_values=out.past_key_values, use_cache=True)
        finally:
            handle.remove()
        msg = str(err.value)
        assert f"in the {tensor} of layer {layer}." in msg, (protocol, when, layer, msg)
        assert "non-finite" in msg
