"""GPU readiness, checked on CPU: what a CUDA run changes besides the device.

* dtypes: on a GPU the embedded model loads in bf16 (`kvlab.models.default_dtype`). The identity
  method must stay bit-exact to the bare model in bf16 and fp16 in the fake, prefill-decode and
  decode protocols (decode against a hand-written DynamicCache loop); every registered method must
  run in both dtypes; the shared quantizers (`kvlab.quant.primitives`) compute in fp32 and return
  the input dtype, so a bf16/fp16 result equals the fp32 computation on the upcast input, cast back;
  fp16 fields saturate instead of overflowing; bits are booked in float32.
* devices: `device_map` splits a model with accelerate, whose hooks wrap the modules (and load
  disk-offloaded weights at forward time). On a CPU-only machine the split that still installs
  those hooks is "cpu" plus "disk" offload (`kvlab.load(..., device_map=...)`; also a from_pretrained
  folder), and `accelerate.dispatch_model(force_hooks=True)` on an all-cpu map. kvlab's hooks must
  still fire (capture, quantization, the finiteness check over parameters on several devices)
  and identity must stay exact.

`KVLAB_TEST_DEVICE=cuda` runs the dtype tests on that device (`benchmarks/gpu_check.sh` does, on a
machine with a GPU; never part of CI); the split-model tests stay on CPU, and two more split a
model between a GPU and CPU offload / two GPUs where those exist.
"""
import os

import pytest
import torch
from transformers.cache_utils import DynamicCache

import kvlab
from kvlab import KVLabError, models
from kvlab.calibration import calibrate
from kvlab.core.ledger import Ledger
from kvlab.hooks import capture, quantize
from kvlab.protocols import supports
from kvlab.quant import parse
from kvlab.quant import primitives as P
from kvlab.quant.base import Quantized
from kvlab.quant.registry import representatives

FAMILIES = models.TINY_FAMILIES
LOW = [torch.bfloat16, torch.float16]
DEVICE = models.check_device(os.environ.get("KVLAB_TEST_DEVICE", "cpu"))   # the dtype tests' device
CUDA = torch.cuda.is_available()


def _ids(b=2, t=40, seed=0, device=None):
    ids = torch.randint(3, 300, (b, t), generator=torch.Generator().manual_seed(seed))
    return ids.to(DEVICE if device is None else device)


def _tiny(family, dtype, device=None):
    m = models.tiny(family).model.to(device=DEVICE if device is None else device, dtype=dtype)
    assert m.dtype == dtype
    return m


def _token_loop(model, ids, p, cache=None):
    """Prefill p tokens, then one token per forward (as tests/core/test_decode.py); all logits, concatenated."""
    out = model(ids[:, :p], past_key_values=cache, use_cache=True)
    past, logits = out.past_key_values, [out.logits]
    for t in range(p, ids.shape[1]):
        out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def _identity_exact_in_every_protocol(m, ids, ref_model=None):
    """fp16 (identity) under fake, prefill-decode and decode gives the bare model's logits bit for bit.
    `ref_model`: where the bare logits come from (default: `m` itself)."""
    r = ref_model if ref_model is not None else m
    ctx, cont = ids[:, :24], ids[:, 24:]
    ref = r(ids).logits
    ref_ctx = r(ctx)
    ref_cont = r(cont, past_key_values=ref_ctx.past_key_values).logits
    ref_loop = _token_loop(r, ids[:1], 16, DynamicCache(config=r.config))
    assert torch.isfinite(ref).all()
    with quantize(m, "fp16", protocol="fake") as run:
        out = m(ids).logits
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    assert run.summary()["avg_bits"] == 16.0
    with quantize(m, "fp16", protocol="prefill-decode") as run:
        out = m(ctx)
        assert torch.equal(out.logits, ref_ctx.logits)
        assert torch.equal(m(cont, past_key_values=out.past_key_values).logits, ref_cont)
    assert run.summary()["avg_bits"] == 16.0
    with quantize(m, "fp16", protocol="decode") as run:
        got = _token_loop(m, ids[:1], 16)
    assert torch.equal(got, ref_loop)
    s = run.summary()
    assert s["decode_steps"] == ids.shape[1] - 16 and s["avg_bits_end"] == 16.0


# ---------------------------------------------------------------------------------------------- dtypes
@torch.no_grad()
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_is_bit_exact_in_bf16_and_fp16(family, dtype):
    _identity_exact_in_every_protocol(_tiny(family, dtype), _ids())


@torch.no_grad()
def _run_method(lm, method, protocol, ids):
    m = lm.model
    with quantize(m, method, protocol=protocol) as run:
        if protocol == "fake":
            out = m(ids)
            logits = out.logits
        elif protocol == "prefill-decode":
            past = m(ids[:, :32]).past_key_values
            out = m(ids[:, 32:], past_key_values=past)
            logits = out.logits
        else:
            logits = _token_loop(m, ids, 32)
            out = None
    return logits, out, run.summary()


@pytest.mark.parametrize("protocol", ["fake", "prefill-decode", "decode"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("spec", representatives())
def test_every_method_runs_in_bf16_and_fp16(spec, dtype, protocol):
    method = parse(spec)
    if not supports(method, protocol):
        pytest.skip(f"{spec} does not run in the {protocol} protocol")
    backend = getattr(method, "backend", None)
    if backend is not None:
        from kvlab.quant.methods.hf_cache import backend_available
        ok, why = backend_available(backend)
        if not ok:
            pytest.skip(why)
    lm = models.tiny("llama")
    lm.model.to(device=DEVICE, dtype=dtype)
    ids = _ids(2, 48 if protocol != "decode" else 40)
    method = calibrate(lm, method, ids=_ids(2, 64))        # the fit runs on the bf16/fp16 model too
    logits, out, s = _run_method(lm, method, protocol, ids)
    assert logits.dtype == dtype and torch.isfinite(logits).all(), spec
    assert 0 < s["avg_bits"] <= 16.0 + 1e-6, s
    if out is not None and not getattr(method, "replaces_cache", False):
        layer = out.past_key_values.layers[0]
        assert layer.keys.dtype == dtype and layer.values.dtype == dtype     # methods return the input dtype


def _x(dtype, shape=(2, 2, 24, 16), scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    x[..., 3] *= 8                                            # an outlier channel, as keys have
    return x.to(device=DEVICE, dtype=dtype)


PRIMITIVES = {
    "uniform-token": lambda x: P.quantize_uniform(x, 3, dim=-1),
    "uniform-channel-group": lambda x: P.quantize_uniform(x, 2, dim=-2, group=8),
    "uniform-ragged-group": lambda x: P.quantize_uniform(x, 2, dim=-2, group=10),
    "uniform-symmetric": lambda x: P.quantize_uniform(x, 4, dim=-1, symmetric=True),
    "uniform-mean": lambda x: P.quantize_uniform(x, 2, dim=-1, center="mean"),
    "uniform-tensor-bits": lambda x: P.quantize_uniform(
        x, torch.arange(x.shape[-2]).remainder(4).add(1).expand(*x.shape[:-1]).unsqueeze(-1), dim=-1),
    "grouped-head": lambda x: P.quantize_grouped(x, 3, "head"),
    "grouped-layer": lambda x: P.quantize_grouped(x, 2, "layer", group=64),
    "normal": lambda x: P.quantize_normal(x, 3, dim=-1, group=8),
    "normal-excluded": lambda x: P.quantize_normal(x, 2, level="head",
                                                   exclude=P.split_outliers(x, 0.05, level="head")[1]),
    "codebook-minmax": lambda x: P.quantize_to_codebook(x, P.uniform_codebook(3), dim=-2, group=8),
    "codebook-kmeans": lambda x: P.quantize_to_codebook(x, P.kmeans_codebook(torch.linspace(-1, 1, 50) ** 3, 2)),
    "split-outliers": lambda x: P.split_outliers(x, 0.05, dim=-1, mode="sides"),
    "split-outliers-magnitude": lambda x: P.split_outliers(x, 0.1, level="head"),
    "merge-outliers": lambda x: (P.merge_outliers(P.quantize_uniform(x, 2)[0], x,
                                                  P.split_outliers(x, 0.1)[1]), torch.zeros((), device=x.device)),
}


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_primitives_compute_in_fp32_and_return_the_input_dtype(name, dtype):
    """A bf16/fp16 input gives exactly the fp32 computation on the upcast input, cast back to the input
    dtype; the bits (or masks) are the fp32 run's."""
    x = _x(dtype)
    low, ref = PRIMITIVES[name](x), PRIMITIVES[name](x.float())
    assert low[0].dtype == dtype and ref[0].dtype == torch.float32
    assert torch.equal(low[0], ref[0].to(dtype)), name
    assert low[1].dtype == ref[1].dtype and torch.equal(low[1], ref[1])
    if low[1].is_floating_point():
        assert low[1].dtype == torch.float32                 # bits: float32, never the model dtype


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_qnorm_kmeans_and_quantiles_compute_in_fp32(dtype):
    x = _x(dtype)
    xh = P.quantize_uniform(x, 2)[0]
    got, bits = P.qnorm(xh, x, dim=-1)
    want, want_bits = P.qnorm(xh.float(), x.float(), dim=-1)
    assert got.dtype == dtype and torch.equal(got, want.to(dtype)) and torch.equal(bits, want_bits)
    v = x.flatten()
    assert torch.equal(P.kmeans_1d(v, 4, weights=v.abs()), P.kmeans_1d(v.float(), 4, weights=v.float().abs()))
    assert torch.equal(P.quantile_along(x, 0.9, -2), P.quantile_along(x.float(), 0.9, -2))


def test_masked_mean_std_sums_in_fp32():
    """bf16 sums (of 0/1 weights: the count; of values) keep 8 significant bits: a bf16 mean of these
    1001 values is 3.03125 against 3.02849."""
    xg = (torch.randn(1, 1001, generator=torch.Generator().manual_seed(0)) + 3).to(DEVICE, torch.bfloat16)
    mu, sd = P._masked_mean_std(xg, torch.ones(1, 1001, dtype=torch.bool))
    assert mu.dtype == torch.float32
    assert mu.item() == pytest.approx(xg.double().mean().item(), rel=1e-6)
    assert sd.item() == pytest.approx(xg.double().std(unbiased=False).item(), rel=1e-5)


def test_fp16_fields_round_as_half_and_saturate():
    t = torch.tensor([0.1, -3.3, 1e-9, 65504.0, 65519.0, -65510.0, 1e5, -2e9, float("inf"), float("nan")])
    got = P._fp16(t)
    within = t.abs() < 65520
    assert torch.equal(got[within], t[within].half().float())            # fp32 results unchanged
    assert torch.equal(got[~within & ~t.isnan()].abs(), torch.full((3,), P.F16_MAX))
    assert got[-1].isnan()


@pytest.mark.parametrize("name", ["uniform-token", "uniform-channel-group", "uniform-symmetric", "uniform-mean",
                                  "grouped-head", "normal", "codebook-minmax", "merge-outliers"])
def test_bf16_values_beyond_the_fp16_range_stay_finite(name):
    """bf16 reaches 3e38, fp16 fields 65504: a zero point or scale beyond that saturates instead of turning
    the group into inf/NaN (which the finiteness check would report as a failed run)."""
    x = _x(torch.bfloat16, scale=3e4)                            # outlier channel ~ +-1e6
    assert x.float().abs().max() > P.F16_MAX
    out = PRIMITIVES[name](x)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_fp16_ranges_that_overflow_fp16_are_computed_in_fp32():
    """max - min of an fp16 group can exceed 65504 (here 120000): computed in fp32, the scale is finite."""
    x = torch.linspace(-60000, 60000, 16).to(torch.float16).view(1, 1, 1, 16)
    xh, bits = P.quantize_uniform(x, 4, dim=-1)
    assert xh.dtype == torch.float16 and torch.isfinite(xh).all()
    rel = ((xh.float() - x.float()).norm() / x.float().norm()).item()
    assert rel < 0.1 and bits.dtype == torch.float32


def test_constants_and_bits_ignore_torch_default_dtype():
    """GPU users sometimes set a bf16 default dtype; bits and codebooks are float32 all the same."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        x = _x(torch.bfloat16)
        assert P.uniform_codebook(2).dtype == torch.float32
        assert P.codebook_bits(P.uniform_codebook(2)).dtype == torch.float32
        assert P.quantize_normal(x, 2)[1].dtype == torch.float32
        assert P.quantize_to_codebook(x, P.uniform_codebook(2))[1].dtype == torch.float32
        assert P.qnorm(x, x)[1].dtype == torch.float32
        assert P.hadamard_matrix(128).dtype == torch.float32
    finally:
        torch.set_default_dtype(old)


def test_hadamard_is_built_in_fp32_and_orthogonal():
    h = P.hadamard_matrix(128)
    assert h.dtype == torch.float32
    assert torch.allclose(h @ h.mT, torch.eye(128), atol=1e-6)
    hb = P.hadamard_matrix(128, dtype=torch.bfloat16).float()     # what a bf16 rotation would use
    assert (hb @ hb.mT - torch.eye(128)).abs().max() > 1e-4        # not orthogonal: rotate in fp32


def test_ledger_books_bf16_and_fp16_bits_in_fp32():
    x = torch.ones(1, 1, 1, 4)
    for dtype in LOW:
        led = Ledger(1)
        for _ in range(300):                 # a bf16 running sum of 1s sticks at 256
            led.quantized(0, "k", x, Quantized(x, torch.ones((), dtype=dtype)))
        assert led.total_bits().item() == 300.0
        assert led.bits_by_layer()[0, 0].item() == 300.0
    led = Ledger(1)
    led.quantized(0, "k", x, Quantized(x, torch.tensor(5.0)))
    assert led.bits[(0, "k")].dtype == torch.float32                # fp32 bits booked as they come


# ---------------------------------------------------------------------------------------------- devices
def _device_map(model, disk_layer: int | None = -1) -> dict:
    """Every module of a tiny causal LM on cpu, one decoder layer on "disk" (offloaded, loaded by
    accelerate's hook at forward time); `disk_layer=None`: all on cpu."""
    inner = dict(model.model.named_children())
    dm = {f"model.{k}": "cpu" for k in inner if k != "layers"}
    n = len(model.model.layers)
    disk = None if disk_layer is None else disk_layer % n
    dm.update({f"model.layers.{i}": "disk" if i == disk else "cpu" for i in range(n)})
    dm["lm_head"] = "cpu"
    return dm


def _hooked(model) -> list[str]:
    from accelerate.hooks import AlignDevicesHook
    return [n for n, mod in model.named_modules() if isinstance(getattr(mod, "_hf_hook", None), AlignDevicesHook)]


def _dispatched(family, kind, dtype=torch.float32):
    """A tiny model split by accelerate: kind "disk" through kvlab.load(device_map=...), "cpu-hooks" with
    dispatch_model(force_hooks=True) on an all-cpu map."""
    if kind == "disk":
        plain = models.tiny(family).model
        lm = kvlab.load(f"tiny-{family}", device_map=_device_map(plain), dtype=dtype)
        assert "meta" in {p.device.type for p in lm.model.parameters()}      # offloaded until its forward
        assert lm.extra["offload_dir"] is not None
        return lm
    from accelerate import dispatch_model
    lm = models.tiny(family)
    lm.model.to(dtype)
    lm.model = dispatch_model(lm.model, device_map=_device_map(lm.model, None), force_hooks=True)
    return lm


@torch.no_grad()
@pytest.mark.parametrize("kind", ["disk", "cpu-hooks"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dispatched_model_keeps_identity_exact(family, kind):
    lm = _dispatched(family, kind)
    hooked = _hooked(lm.model)
    assert any(".layers.1" in n for n in hooked) and any("self_attn" in n for n in hooked)
    _identity_exact_in_every_protocol(lm.model, _ids(device="cpu"), ref_model=models.tiny(family).model)


@torch.no_grad()
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_dispatched_model_identity_exact_in_low_precision(dtype):
    lm = _dispatched("llama", "disk", dtype)
    assert lm.model.dtype == dtype
    _identity_exact_in_every_protocol(lm.model, _ids(device="cpu"), ref_model=_tiny("llama", dtype, "cpu"))


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3"])   # k_proj, k_norm, sliding, fused qkv
def test_dispatched_model_captures_and_quantizes_as_the_plain_model(family):
    plain = models.tiny(family).model
    lm = _dispatched(family, "disk")
    ids = _ids(device="cpu")
    what = ("k_pre", "k", "v", "q", "attn")
    results = {}
    for name, m in (("plain", plain), ("split", lm.model)):
        with capture(m, what=what) as cap:
            m(ids)
        with quantize(m, "int4", protocol="fake") as fake:
            f = m(ids).logits
        with quantize(m, "kivi:bits=2,group=4,residual=8", protocol="prefill-decode") as pd:
            past = m(ids[:, :24]).past_key_values
            p = m(ids[:, 24:], past_key_values=past).logits
        with quantize(m, "int4", protocol="decode") as dec:
            d = _token_loop(m, ids[:1], 16)
        results[name] = ({k: [t.clone() for t in cap[k]] for k in what}, f, p, d,
                         fake.summary(), pd.summary(), dec.summary())
    (cap_a, *rest_a), (cap_b, *rest_b) = results["plain"], results["split"]
    for k in what:                                          # kvlab's hooks fired inside accelerate's
        assert len(cap_b[k]) == len(cap_a[k]) and all(torch.equal(a, b) for a, b in zip(cap_a[k], cap_b[k])), k
    for a, b in zip(rest_a[:3], rest_b[:3]):
        assert torch.equal(a, b)                            # quantized exactly as on the plain model
    assert not torch.equal(rest_b[0], plain(ids).logits)   # int4 did change the logits
    for a, b in zip(rest_a[3:], rest_b[3:]):
        assert a["avg_bits"] == b["avg_bits"] and a["k_rel_err"] == b["k_rel_err"]


@torch.no_grad()
def test_finiteness_check_names_the_layer_on_a_split_model():
    """Parameters on cpu and meta (offloaded): the session takes its multi-device path, and a NaN in the
    offloaded layer's values is still reported with its layer."""
    lm = _dispatched("llama", "disk")
    from kvlab.core.session import Session
    assert not Session(lm.model)._one_device
    attn = lm.model.model.layers[1].self_attn

    def poison(mod, inputs, out):
        out = out.clone()
        out[..., -1, 0] = float("nan")
        return out
    handle = attn.v_proj.register_forward_hook(poison)
    try:
        with pytest.raises(KVLabError) as err:
            with quantize(lm.model, "int4", protocol="fake"):
                lm.model(_ids(device="cpu"))
    finally:
        handle.remove()
    assert "layer 1" in str(err.value) and "values" in str(err.value)


@torch.no_grad()
def test_load_from_a_folder_offloads_to_disk(tmp_path):
    """from_pretrained(device_map=...) with a "disk" entry needs an offload folder: kvlab.load supplies one."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    plain = models.tiny("llama").model
    plain.save_pretrained(tmp_path)
    tok = Tokenizer(tok_models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    lm = kvlab.load(str(tmp_path), device_map=_device_map(plain))
    assert lm.model.dtype == torch.float32                  # a cpu/disk map loads in float32
    assert "meta" in {p.device.type for p in lm.model.parameters()} and _hooked(lm.model)
    _identity_exact_in_every_protocol(lm.model, _ids(device="cpu"), ref_model=plain)


def test_load_device_map_strategy_and_errors():
    lm = kvlab.load("tiny-llama", device_map="auto")         # CPU-only: everything on cpu
    assert {p.device.type for p in lm.model.parameters()} == {"cpu"}
    with pytest.raises(KVLabError, match="lm_head"):
        kvlab.load("tiny-llama", device_map={"model": "cpu"})


@torch.no_grad()
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it where one is lent)")
@pytest.mark.parametrize("second", ["cpu", "cuda:1"])
def test_split_between_gpu_and_cpu_offload_or_a_second_gpu(second):
    """The deployed splits: layer 1 offloaded to CPU (accelerate loads it onto the GPU at forward time) or
    placed on a second GPU (the finiteness sums then live on two devices)."""
    if second == "cuda:1" and torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    plain = models.tiny("llama").model
    dm = {k: 0 for k in _device_map(plain)}
    dm["model.layers.1"] = 1 if second == "cuda:1" else "cpu"
    lm = kvlab.load("tiny-llama", device_map=dm)
    assert lm.model.dtype == models.default_dtype("cuda:0") and _hooked(lm.model)
    from kvlab.core.session import Session
    assert not Session(lm.model)._one_device
    ref = plain.to(device="cuda:0", dtype=lm.model.dtype)
    _identity_exact_in_every_protocol(lm.model, _ids(device="cuda:0"), ref_model=ref)
    ids = _ids(device="cuda:0")
    with quantize(ref, "int4") as a:
        want = ref(ids).logits
    with quantize(lm.model, "int4") as b:
        got = lm.model(ids).logits
    assert torch.equal(got, want) and a.summary()["avg_bits"] == b.summary()["avg_bits"]
