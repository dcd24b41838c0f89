"""Recipes: a strict, versioned YAML schema.

Every section is a frozen pydantic model with ``extra="forbid"``: an unknown key fails with its
full path (``towers.vison: Extra inputs are not permitted``). Schemes are preset names or
mappings (see ``quantize.schemes``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from calibrate.config import TEXT_SOURCE_KEYS, CalibrationConfig, expand_path, source_error
from quantize.errors import RecipeError
from quantize.fit.spec import FitRecord, FitSpec
from quantize.schemes import QuantScheme, resolve_scheme

RECIPE_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Towers(_Strict):
    """Default scheme of each tower (see ``quantize.model.TOWERS``). Norms are never quantized."""

    text: QuantScheme = Field(default_factory=lambda: resolve_scheme("int4"))
    token_embeddings: QuantScheme = Field(default_factory=lambda: resolve_scheme("int8_row"))
    per_layer_embeddings: QuantScheme = Field(default_factory=lambda: resolve_scheme("int8_row"))
    per_layer_projections: QuantScheme = Field(default_factory=lambda: resolve_scheme("keep"))
    altup_laurel: QuantScheme = Field(default_factory=lambda: resolve_scheme("keep"))
    vision: QuantScheme = Field(default_factory=lambda: resolve_scheme("int8_channel"))
    audio: QuantScheme = Field(default_factory=lambda: resolve_scheme("int8_channel"))
    embedders: QuantScheme = Field(default_factory=lambda: resolve_scheme("keep"))

    @field_validator("*", mode="before")
    @classmethod
    def _resolve(cls, v):
        return resolve_scheme(v)


class Override(_Strict):
    """Give tensors matching any of ``match`` (globs on checkpoint names) their own scheme."""

    match: list[str] = Field(min_length=1)
    scheme: QuantScheme

    @field_validator("scheme", mode="before")
    @classmethod
    def _resolve(cls, v):
        return resolve_scheme(v)


class KVCache(_Strict):
    """Optional fp8 KV cache: one k scale and one v scale per KV-sharing group."""

    fp8: bool = False


GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GGUF_MIXES = ("Q8_0", "Q4_0", "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "F16", "F32", "auto")


def _gguf_type(v: str | None) -> str | None:
    if v is not None and v not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {v!r}; valid: {', '.join(GGUF_TYPES)}")
    return v


class GGUFTensorType(_Strict):
    """Give GGUF tensors matching any of ``match`` (globs on GGUF names, e.g. ``blk.*.ffn_down.weight``)
    the GGUF type ``type``, like ``llama-quantize --tensor-type``. Later rules win."""

    match: list[str] = Field(min_length=1)
    type: str

    @field_validator("type")
    @classmethod
    def _type(cls, v):
        return _gguf_type(v)


class GGUFExport(_Strict):
    enabled: bool = True
    # ``auto`` derives each tensor's GGUF type from its scheme (int4 g32 sym -> Q4_0, ...);
    # a mix name forces llama.cpp's familiar per-tensor type choices.
    mix: str = "auto"
    token_embeddings: str | None = None  # GGUF type for token_embd (default: from the mix)
    per_layer_embeddings: str | None = None  # GGUF type for per_layer_token_embd
    # per-tensor GGUF types by name (after the mix; the embedding options above win for their tables)
    tensor_types: list[GGUFTensorType] = Field(default_factory=list)
    # true: write the vision mmproj or refuse the run; false: never; auto: write it where llama.cpp's
    # mtmd can run it (text width = vision width, as in E2B/E4B), else skip with a manifest note.
    mmproj: bool | Literal["auto"] = "auto"
    force: bool = False  # write even where llama.cpp's hard-coded Gemma 3n layout differs
    # choose tensor_types by measurement for a budget or device (``quantize fit``; quantize.fit.spec)
    fit: FitSpec | None = None
    # what fit predicted for these tensor_types (written by fit; informational, recorded in the manifest)
    fitted: FitRecord | None = None

    @field_validator("mix")
    @classmethod
    def _mix(cls, v):
        if v not in GGUF_MIXES:
            raise ValueError(f"unknown GGUF mix {v!r}; valid: {', '.join(GGUF_MIXES)}")
        return v

    @field_validator("token_embeddings", "per_layer_embeddings")
    @classmethod
    def _type(cls, v):
        return _gguf_type(v)


class SafetensorsExport(_Strict):
    enabled: bool = True
    format: Literal["compressed-tensors", "bitsandbytes"] = "compressed-tensors"
    bnb: Literal["nf4", "fp4", "int8"] = "nf4"  # used when format is bitsandbytes
    max_shard_gb: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _bnb_read(self):
        if self.format != "bitsandbytes" and self.bnb != type(self).model_fields["bnb"].default:
            raise ValueError(f"bnb is read with format 'bitsandbytes' only; the format is {self.format!r}")
        return self


class Exports(_Strict):
    gguf: GGUFExport | None = None
    safetensors: SafetensorsExport | None = None

    @model_validator(mode="after")
    def _some(self):
        if self.gguf is None and self.safetensors is None:
            raise ValueError("exports: name at least one of 'gguf' or 'safetensors'")
        return self


class EvalText(_Strict):
    """The text ``eval`` scores: the embedded held-out split, local files or a ``datasets`` split
    (read like calibration text; see calibrate/config.py)."""

    source: Literal["embedded", "files", "hub"] = "embedded"
    path: str | None = None  # files: a file, a folder or a glob
    dataset: str | None = None  # hub: datasets id or a local dataset folder
    name: str | None = None  # hub: datasets config
    split: str | None = None  # hub: default "test"
    column: str | None = None  # hub, and jsonl/parquet/csv files: default "text"

    @field_validator("path", "dataset")
    @classmethod
    def _expand(cls, v):
        return expand_path(v)

    @model_validator(mode="after")
    def _needs(self):
        error = source_error(self, TEXT_SOURCE_KEYS)
        if error:
            raise ValueError(error)
        if self.source == "embedded" and self.split not in (None, "eval"):
            raise ValueError("the embedded text has only its held-out split 'eval'; use source 'files' or 'hub' for other text")
        return self


class EvalSpec(_Strict):
    """What ``quantize run`` measures on what it wrote (``--no-eval`` skips it): the source model
    and each artifact, against the source model, in ``OUTPUT/eval/``."""

    perplexity: bool = True  # perplexity on the text's windows
    kl: bool = True  # KL divergence against the source model (needs the source model's forward)
    latency: bool = False  # prefill and decode timing
    towers: bool = False  # vision/audio embedding cosine checks
    n_windows: int = Field(8, ge=1)
    seq_len: int = Field(256, ge=16)
    text: EvalText = EvalText()

    @model_validator(mode="after")
    def _something(self):
        if not (self.perplexity or self.kl or self.latency or self.towers):
            raise ValueError("eval asks for nothing: set one of perplexity, kl, latency, towers (or drop 'eval')")
        return self


class Recipe(_Strict):
    version: Literal[1] = RECIPE_VERSION
    name: str = "recipe"
    model: str
    output: str
    seed: int = 0
    device: str = "cpu"
    # The text decoder's calibration forward: the layer being calibrated and the activations
    # passed on to the next. bfloat16 (E4B's own dtype) runs its matmuls faster where the hardware
    # has bf16 instructions (2.6x measured on an AVX512-BF16 CPU; slower on CPUs without); Hessians and importance are
    # still accumulated, and GPTQ solved, in float32. Needs a decoder stored in bfloat16. auto: bfloat16
    # where that holds, no AWQ folds scales, and the device multiplies bf16 in hardware
    # (quantize.device.native_bf16), else float32; the manifest records which and why. float32
    # (the default) does not depend on the machine's bf16 support.
    compute_dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    calibration: CalibrationConfig = CalibrationConfig()
    towers: Towers = Towers()
    overrides: list[Override] = []
    ignore: list[str] = []  # globs of tensors kept as they are
    kv_cache: KVCache = KVCache()
    exports: Exports = Exports(safetensors=SafetensorsExport())
    eval: EvalSpec | None = None

    @field_validator("model", "output")
    @classmethod
    def _expand(cls, v):
        return expand_path(v)  # a hub id or builtin: name has no ~ or $ and stays as it is

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        from quantize.device import parse_device  # the same grammar as eval's --device

        parse_device(v)  # its ValueError names what is valid
        return v


def format_validation_error(path: Path, err: ValidationError, schema: type[BaseModel] | None = None) -> str:
    """One line: the file, the key's path and pydantic's message; with ``schema`` (the root
    model), an unknown key also lists the valid keys at its place."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if schema is not None and first["type"] == "extra_forbidden":
        model = _model_at(schema, first["loc"][:-1])
        if model is not None:
            msg += f"; valid keys: {', '.join(model.model_fields)}"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{path}: {loc}: {msg}{more}"


def _model_at(schema: type[BaseModel], loc) -> type[BaseModel] | None:
    """The schema class at a validation error's location (list indices skipped)."""
    model = schema
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        nxt = next((a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def parse_recipe(data: Any, source: str | Path = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(Path(str(source)), e)) from None


def read_yaml(path: str | Path, what: str = "recipe", error: type[Exception] = RecipeError) -> Any:
    """The parsed YAML of a file (recipes, sweeps); a missing file or bad YAML is one ``error``
    line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_recipe(path: str | Path, **overrides: Any) -> Recipe:
    """Read and validate a recipe file; ``overrides`` replace top-level keys (CLI flags)."""
    path = Path(path)
    data = read_yaml(path)
    if isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_recipe(data, path)
