"""SWEEP.yaml: a base recipe, a grid of overrides, task settings and the evaluation devices.

Strict like recipes: an unknown key fails with its path and the valid keys.

    version: 1
    name: int4-vs-int8
    base: recipes/int4.yaml          # a recipe file (relative to this file) or an inline mapping
    output: out/sweep                # variants in output/<variant>/, results/ and report.md there
    grid:                            # dotted recipe keys -> values; the sweep is their product
      model: [google/gemma-3n-E2B-it, google/gemma-3n-E4B-it]
      towers.text: [int4, int4_gptq, int8]
      calibration.text: [{source: embedded, n_samples: 128}, {source: files, path: data/*.jsonl}]
    cpus_per_task: 4
    max_retries: 2
    pending_timeout_s: 600
    eval:
      n_windows: 4
      seq_len: 256
      devices:
        - {name: orin-nano, resources: {jetson_orin_nano: 1}, device: cuda, threads: 6}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from quantize.errors import RecipeError
from quantize.recipe import Recipe, format_validation_error, read_yaml

SWEEP_VERSION = 1
# Set per variant by the sweep itself: a grid over them would collide in one folder.
RESERVED_KEYS = ("name", "output")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class SweepError(RecipeError):
    """The sweep file is missing, not YAML, breaks the schema, or a variant is not a valid recipe."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _plain_name(v: str) -> str:
    if not v or not set(v) <= _NAME_CHARS:
        raise ValueError(f"{v!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
    return v


class EvalDevice(_Strict):
    """One evaluation target: the node(s) that carry ``resources`` (Ray custom resources, e.g.
    ``{jetson_orin_nano: 1}`` from ``ray start --resources``) run llama.cpp on ``device``."""

    name: str
    resources: dict[str, float] = Field(min_length=1)
    device: Literal["cpu", "cuda"] = "cpu"  # llama.cpp's device on that node (cuda: all layers offloaded)
    threads: int | None = Field(None, ge=1)
    num_cpus: float = Field(1, ge=0)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return _plain_name(v)

    @field_validator("resources")
    @classmethod
    def _positive(cls, v):
        for k, n in v.items():
            if n <= 0:
                raise ValueError(f"resources.{k}: {n} must be > 0")
        return v


class SweepEval(_Strict):
    devices: list[EvalDevice] = Field(min_length=1)
    n_windows: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=16)
    latency: bool = False

    @field_validator("devices")
    @classmethod
    def _unique(cls, v):
        names = [d.name for d in v]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"device names must be unique; repeated: {', '.join(dup)}")
        return v


class SweepSpec(_Strict):
    version: Literal[1] = SWEEP_VERSION
    name: str = "sweep"
    base: str | dict[str, Any]
    output: str
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    cpus_per_task: float = Field(1, gt=0)
    max_retries: int = Field(2, ge=0)  # Ray retries of a task whose worker died (never of a bad recipe)
    pending_timeout_s: float = Field(600, gt=0)  # how long a task may wait for a node that can run it
    eval: SweepEval | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return _plain_name(v)

    @field_validator("grid")
    @classmethod
    def _grid(cls, v):
        fields = [f for f in Recipe.model_fields if f not in RESERVED_KEYS]
        for key, values in v.items():
            head = key.split(".")[0]
            if head in RESERVED_KEYS:
                raise ValueError(f"{key}: set by the sweep for each variant; valid keys start with: {', '.join(fields)}")
            if head not in fields or "" in key.split("."):
                raise ValueError(f"{key}: not a recipe key; valid keys start with: {', '.join(fields)}")
            if not values:
                raise ValueError(f"{key}: give at least one value")
        return v


def parse_sweep(data: Any, source: str | Path = "<sweep>") -> SweepSpec:
    if not isinstance(data, dict):
        raise SweepError(f"{source}: a sweep is a YAML mapping, got {type(data).__name__}")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise SweepError(format_validation_error(Path(str(source)), e, SweepSpec)) from None


def load_sweep(path: str | Path) -> SweepSpec:
    return parse_sweep(read_yaml(path, "sweep", SweepError), path)
