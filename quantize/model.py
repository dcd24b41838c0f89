"""Finding, opening and describing a Gemma 3n checkpoint without loading it whole.

``resolve_model`` turns a recipe's ``model`` (``builtin:tiny-trained``, a local folder or a hub
id) into a local folder; ``Checkpoint`` reads tensors one at a time from its safetensors
shards; ``tower_of`` sorts each tensor into a tower; ``kv_groups`` lists the KV-sharing groups.
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from quantize.errors import ModelError

BUILTIN_PREFIX = "builtin:"
BUILTINS = {"builtin:tiny-trained": "trained", "builtin:tiny-random": "random"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]

# Towers, in display order. Each tensor belongs to exactly one.
TOWERS = (
    "text",  # decoder linears q, k, v, o, gate, up, down
    "token_embeddings",
    "per_layer_embeddings",
    "per_layer_projections",  # per-layer input gate/projection and the model-level projection
    "altup_laurel",
    "vision",
    "audio",
    "embedders",  # multimodal embedders (vision and audio soft tokens -> text width)
    "norms",  # every 1-D tensor: norms, biases, scales. Never quantized.
)

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
_TEXT_LINEAR_RE = re.compile(r"language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")


def tower_of(name: str, ndim: int) -> str:
    """The tower a checkpoint tensor belongs to (Google's and transformers' naming)."""
    if ndim <= 1:
        return "norms"
    if "vision_tower" in name:
        return "vision"
    if "audio_tower" in name:
        return "audio"
    if "embed_vision" in name or "embed_audio" in name:
        return "embedders"
    if name.endswith("embed_tokens_per_layer.weight"):
        return "per_layer_embeddings"
    if name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
        return "token_embeddings"
    if _TEXT_LINEAR_RE.search(name):
        return "text"
    if "per_layer" in name:
        return "per_layer_projections"
    if "altup" in name or "laurel" in name:
        return "altup_laurel"
    raise ModelError(f"tensor {name!r} matches no known Gemma 3n tower")


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m and "language_model" in name else None


def glob_match(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class KVGroup:
    """A producer layer and the layers that reuse its K/V cache."""

    attention_type: str  # "sliding_attention" or "full_attention"
    producer: int
    consumers: tuple[int, ...]

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.producer, *self.consumers)

    def describe(self) -> str:
        kind = "sliding" if self.attention_type.startswith("sliding") else "full"
        return f"{kind}: layer {self.producer} -> layers {', '.join(map(str, self.consumers))}"


def kv_groups(text_config: dict) -> list[KVGroup]:
    """KV-sharing groups of a Gemma 3n text config (dict as in config.json's ``text_config``).

    Mirrors transformers' ``Gemma3nTextConfig.kv_sharing_modes``: layers from
    ``num_hidden_layers - num_kv_shared_layers`` on reuse the cache of the last earlier layer of
    the same attention type.
    """
    n = text_config["num_hidden_layers"]
    shared = text_config.get("num_kv_shared_layers", 0) or 0
    types = text_config["layer_types"]
    first = n - shared
    groups = []
    for kind in dict.fromkeys(types):  # keeps first-seen order: sliding, then full
        earlier = [i for i in range(first) if types[i] == kind]
        consumers = tuple(i for i in range(first, n) if types[i] == kind)
        if consumers and not earlier:
            raise ModelError(f"layers {consumers} reuse a {kind} cache but no earlier layer produces one")
        if consumers:
            groups.append(KVGroup(kind, earlier[-1], consumers))
    return groups


def consumer_layers(text_config: dict) -> set[int]:
    return {c for g in kv_groups(text_config) for c in g.consumers}


def is_dead_kv(name: str, consumers: set[int]) -> bool:
    """k/v projections and norms of KV-consumer layers: present in Google's files, never used."""
    i = layer_index(name)
    return i in consumers and re.search(r"self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight$", name) is not None


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
                "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# What ``kv_groups`` and the shape checks read before anything else.
_REQUIRED_TEXT_KEYS = ("num_hidden_layers", "layer_types", "hidden_size")
INDEX_FILE = "model.safetensors.index.json"


def _check_index(folder: Path) -> None:
    """Every shard the index names must be there (a partial download otherwise loads as a
    model with missing tensors)."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ModelError(f"{index}: not a safetensors index (JSON with a weight_map of tensor -> shard)") from None
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(f"{index}: shard {missing[0]}{more} named there is missing from {folder}")


def _expected_shapes(tc: dict) -> list[tuple[re.Pattern, object]]:
    """(tensor name pattern, layer -> (expected shape, what it is made of)) for the text tensors
    whose shapes the config fixes."""
    def get(key):
        v = tc.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    hidden, heads, kv, hd = get("hidden_size"), get("num_attention_heads"), get("num_key_value_heads"), get("head_dim")
    ff = tc.get("intermediate_size")
    n, vocab, vocab_pl, pl = get("num_hidden_layers"), get("vocab_size"), get("vocab_size_per_layer_input"), get("hidden_size_per_layer_input")

    def ff_of(i):
        v = ff[i] if isinstance(ff, list) and i < len(ff) else ff
        return v if isinstance(v, int) else None

    lin = r"language_model\.layers\.(\d+)\."
    rules = [
        (lin + r"self_attn\.q_proj\.weight$", lambda i: ((heads * hd, hidden), "num_attention_heads*head_dim, hidden_size") if heads and hd and hidden else None),
        (lin + r"self_attn\.(k|v)_proj\.weight$", lambda i: ((kv * hd, hidden), "num_key_value_heads*head_dim, hidden_size") if kv and hd and hidden else None),
        (lin + r"self_attn\.o_proj\.weight$", lambda i: ((hidden, heads * hd), "hidden_size, num_attention_heads*head_dim") if heads and hd and hidden else None),
        (lin + r"mlp\.(gate|up)_proj\.weight$", lambda i: ((ff_of(i), hidden), f"intermediate_size[{i}], hidden_size") if ff_of(i) and hidden else None),
        (lin + r"mlp\.down_proj\.weight$", lambda i: ((hidden, ff_of(i)), f"hidden_size, intermediate_size[{i}]") if ff_of(i) and hidden else None),
        (r"language_model\.embed_tokens\.weight$", lambda i: ((vocab, hidden), "vocab_size, hidden_size") if vocab and hidden else None),
        (r"language_model\.embed_tokens_per_layer\.weight$",
         lambda i: ((vocab_pl, n * pl), "vocab_size_per_layer_input, num_hidden_layers*hidden_size_per_layer_input") if vocab_pl and n and pl else None),
    ]
    return [(re.compile(p), f) for p, f in rules]


def check_shapes(tc: dict, tensors: dict[str, TensorInfo], config_path: Path) -> None:
    """Refuse a checkpoint whose text tensors disagree with its config (a config from another
    model size, or a damaged file): quantizing it would fail deep inside, or write a GGUF
    that llama.cpp reads with the config's shapes. Header metadata only."""
    n = tc.get("num_hidden_layers")
    rules = _expected_shapes(tc)
    for name, info in sorted(tensors.items()):  # the first mismatch by name: the same on every run
        i = layer_index(name)
        if i is not None and isinstance(n, int) and i >= n:
            raise ModelError(f"{info.file}: tensor {name!r} is in layer {i}, but {config_path} has "
                             f"text_config.num_hidden_layers = {n}")
        for pattern, expect in rules:
            m = pattern.search(name)
            if not m:
                continue
            got = expect(int(m.group(1)) if pattern.groups and m.group(1).isdigit() else 0)
            if got is not None and tuple(info.shape) != got[0]:
                raise ModelError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, but {config_path} "
                                 f"gives {list(got[0])} ({got[1]})")
            break


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: F32, BF16, F16, ...
    file: Path
    offset: int = -1  # absolute byte offset of the data in ``file`` (-1: unknown)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def bytes_per_element(self) -> int:
        return _DTYPE_BYTES.get(self.dtype, 4)

    @property
    def nbytes(self) -> int:
        return self.numel * self.bytes_per_element


class Checkpoint:
    """A model folder: config plus safetensors shards, read one tensor at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        cfg = self.folder / "config.json"
        if not cfg.is_file():
            raise ModelError(f"{self.folder}: no config.json; a Gemma 3n model folder needs config.json and *.safetensors")
        try:
            self.config = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{cfg}: not valid JSON ({e})") from None
        if not isinstance(self.config, dict) or not isinstance(self.config.get("text_config"), dict):
            raise ModelError(f"{cfg}: no text_config; expected a Gemma3nForConditionalGeneration config")
        for key in _REQUIRED_TEXT_KEYS:
            if key not in self.config["text_config"]:
                raise ModelError(f"{cfg}: text_config.{key} is missing; a Gemma 3n text config needs it")
        self.files = sorted(self.folder.glob("*.safetensors"))
        _check_index(self.folder)
        if not self.files:
            raise ModelError(f"{self.folder}: no *.safetensors files")

    @property
    def text_config(self) -> dict:
        return self.config["text_config"]

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Tensor metadata from the safetensors headers (no tensor data is read), checked
        against the file sizes (truncated shards) and the config (shapes)."""
        out: dict[str, TensorInfo] = {}
        for f in self.files:
            header, data_start = _read_header(f, with_data_start=True)
            end = data_start
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                try:
                    info = TensorInfo(name, tuple(int(d) for d in meta["shape"]), str(meta["dtype"]), f,
                                      data_start + int(meta["data_offsets"][0]))
                    length = int(meta["data_offsets"][1]) - int(meta["data_offsets"][0])
                except (KeyError, TypeError, ValueError, IndexError):
                    raise ModelError(f"{f}: corrupt safetensors header entry for tensor {name!r}") from None
                if info.dtype in _DTYPE_BYTES and length != info.nbytes:
                    raise ModelError(f"{f}: tensor {name!r} ({info.dtype} {list(info.shape)}) needs {info.nbytes} bytes, "
                                     f"the header gives it {length}; the file is corrupt")
                end = max(end, info.offset + length)
                out[name] = info
            size = f.stat().st_size
            if size < end:
                raise ModelError(f"{f}: truncated: its header describes a file of {end} bytes, it has {size} "
                                 "(an interrupted download or copy?)")
        check_shapes(self.text_config, out, self.folder / "config.json")
        return dict(sorted(out.items()))

    def get(self, name: str):
        """One tensor, read from its shard."""
        from safetensors import safe_open

        info = self.tensors.get(name)
        if info is None:
            raise ModelError(f"{self.folder}: tensor {name!r} not found")
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(name)

    def read_rows(self, name: str, start: int, stop: int):
        """Rows ``start:stop`` (first dimension) of one tensor, in its stored dtype.

        Read with plain file reads rather than a memory map: the pages of a mapped 5 GB
        embedding table count towards the process's resident set until it is unmapped, which is
        what pushed whole-tensor reads to twice the table's size. Here only the returned rows
        are resident (the kernel's page cache still serves repeated reads).
        """
        import torch

        info = self.tensors.get(name)
        if info is None:
            raise ModelError(f"{self.folder}: tensor {name!r} not found")
        if info.dtype not in TORCH_DTYPE_NAMES or info.offset < 0:
            return self.get(name)[start:stop]
        rows = info.shape[0] if info.shape else 1
        start, stop = max(0, start), min(rows, stop)
        per_row = info.nbytes // max(rows, 1)
        n = max(0, stop - start) * per_row
        buf = bytearray(n)
        with open(info.file, "rb", buffering=0) as fh:
            fh.seek(info.offset + start * per_row)
            got = fh.readinto(buf) if n else 0
        if got != n:
            raise ModelError(f"{info.file}: truncated data for tensor {name!r} (rows {start}:{stop})")
        dtype = getattr(torch, TORCH_DTYPE_NAMES[info.dtype])
        t = torch.frombuffer(buf, dtype=dtype) if n else torch.empty(0, dtype=dtype)
        return t.reshape(stop - start, *info.shape[1:])

    @cached_property
    def kv_groups(self) -> list[KVGroup]:
        return kv_groups(self.text_config)

    @cached_property
    def consumers(self) -> set[int]:
        return consumer_layers(self.text_config)

    def dead_kv(self) -> list[str]:
        return [n for n in self.tensors if is_dead_kv(n, self.consumers)]


# safetensors dtype -> torch dtype name (torch.<name>)
TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                 "I32": "int32", "I8": "int8", "U8": "uint8"}


def _read_header(path: Path, with_data_start: bool = False):
    import struct

    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ModelError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ModelError(f"{path}: safetensors header of {n} bytes is not plausible")
        raw = fh.read(n)
        if len(raw) != n:
            raise ModelError(f"{path}: truncated safetensors file (its header alone should be {n} bytes)")
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ModelError(f"{path}: corrupt safetensors header (not a JSON object)")
    return (header, 8 + n) if with_data_start else header


def resolve_model(ref: str | Path, allow_pickle: bool = False, cache_dir: str | Path | None = None) -> Path:
    """Local folder for a model reference: ``builtin:tiny-trained|tiny-random``, a folder or a hub id."""
    ref_s = str(ref)
    if ref_s.startswith(BUILTIN_PREFIX):
        if ref_s not in BUILTINS:
            raise ModelError(f"unknown builtin model {ref_s!r}; valid: {', '.join(BUILTINS)}")
        from quantize.tiny import cached_tiny

        return cached_tiny(BUILTINS[ref_s], cache_dir=cache_dir)
    path = Path(ref_s).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path}: a model is a folder with config.json and *.safetensors, not a file")
        return _refuse_pickle(path, allow_pickle)
    if ref_s.startswith((".", "/", "~")) or ref_s.count("/") != 1:
        raise ModelError(f"model {ref_s!r}: no such folder, and not a hub id of the form owner/name")
    return _from_hub(ref_s, allow_pickle)


def _refuse_pickle(folder: Path, allow_pickle: bool) -> Path:
    """The folder itself when it has safetensors; a safetensors copy of a pickle checkpoint only
    with ``allow_pickle`` (unpickling can run arbitrary code)."""
    if any(folder.glob("*.safetensors")):
        return folder
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise ModelError(
            f"{folder}: only pickle checkpoints ({', '.join(pickles)}); they can run code when loaded. "
            "Convert to safetensors, or pass --allow-pickle if you trust the source"
        )
    return _convert_pickle(folder) if pickles else folder


def _convert_pickle(folder: Path) -> Path:
    """Load a trusted pickle checkpoint once with transformers and keep a safetensors copy
    (in the cache, keyed by the pickle files' sizes and mtimes) that the pipeline reads."""
    import hashlib
    import shutil

    from transformers import AutoProcessor, Gemma3nForConditionalGeneration

    from quantize.tiny import default_cache_dir

    key = hashlib.sha256(
        "".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.iterdir())).encode()
    ).hexdigest()[:16]
    dest = default_cache_dir() / f"converted-{folder.name}-{key}"
    if (dest / "config.json").exists():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = Gemma3nForConditionalGeneration.from_pretrained(str(folder), use_safetensors=False, use_kernels=False)
        model.save_pretrained(str(tmp), safe_serialization=True)
        try:
            AutoProcessor.from_pretrained(str(folder)).save_pretrained(str(tmp))
        except Exception:  # a checkpoint without processor files still quantizes (text only)
            pass
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"{folder}: could not convert the pickle checkpoint to safetensors ({e})") from None
    tmp.rename(dest)
    return dest


def _from_hub(repo: str, allow_pickle: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS))
    except Exception as first:  # offline, gated, missing: fall back to the local cache, then explain
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS, local_files_only=True))
        except Exception:
            raise ModelError(
                f"model {repo!r}: not a local folder and could not be fetched from the Hugging Face hub "
                f"({type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}); "
                "when offline it must already be in the hub cache (run once online, or `huggingface-cli download`)"
            ) from None
