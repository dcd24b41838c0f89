"""Pure sweep logic: expand a grid into variant recipes, hash them, decide what a rerun skips,
and size each task's resource request. No Ray here.

Layout of a sweep's output folder::

    OUTPUT/variants/<variant>/      a quantize run's folder (manifest.json, GGUF, safetensors)
    OUTPUT/results/<device>/<variant>.json   one eval results file per variant and device
    OUTPUT/report.md, report.html   every variant on every device
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from quantize.recipe import Recipe, parse_recipe, read_yaml
from quantize.sweep.spec import SweepError, SweepSpec

GIB = 1 << 30
# Memory formula (bytes) of a quantize task, from the dry run's predictions:
#   TASK_BASE_BYTES                  Python + torch + transformers and the streamed pieces
#                                    (README: RTN conversion of E4B peaks at 0.7-0.9 GiB)
# + predicted artifact bytes         the task holds its files in memory to return them
# + checkpoint bytes, if calibrated  GPTQ / AWQ / importance / fp8 KV load the model whole
TASK_BASE_BYTES = 3 * GIB // 2
# Evaluation: 1 GiB plus the reference in transformers (f32: 2x a bf16 checkpoint) for the KL
# base; plus the GGUF mapped by llama.cpp for a device (the GGUF arrives as an array that stays
# in the node's object store, so it is not counted twice).
EVAL_BASE_BYTES = 1 * GIB


@dataclass(frozen=True)
class Variant:
    name: str
    recipe: Recipe
    overrides: dict[str, Any] = field(default_factory=dict)  # this variant's grid values

    @property
    def out(self) -> Path:
        return Path(self.recipe.output)

    @property
    def recipe_hash(self) -> str:
        """Of the recipe as the manifest records it (``recipe_record``: no output folder, no
        eval section, local paths by their last component): what determines the artifacts."""
        from quantize.manifest import recipe_record

        return recipe_hash(recipe_record(self.recipe))


def recipe_hash(recipe_json: dict) -> str:
    """sha256 of a recipe record's canonical JSON."""
    return hashlib.sha256(json.dumps(recipe_json, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def variants_dir(spec: SweepSpec) -> Path:
    return Path(spec.output) / "variants"


def result_path(spec: SweepSpec, device: str, variant: str) -> Path:
    return Path(spec.output) / "results" / device / f"{variant}.json"


def base_recipe_data(spec: SweepSpec, sweep_dir: str | Path) -> dict:
    """The base recipe as a mapping: inline, or read from a file relative to the sweep file."""
    if isinstance(spec.base, dict):
        return copy.deepcopy(spec.base)
    path = Path(sweep_dir) / spec.base
    data = read_yaml(path, "base recipe", SweepError)
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    return data


def set_dotted(data: dict, key: str, value: Any) -> dict:
    """A copy of ``data`` with ``key`` (``towers.text``) set to ``value``; missing mappings are
    made, and a scalar in the way is an error naming the key."""
    out = copy.deepcopy(data)
    node = out
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            where = ".".join(parts[: i + 1])
            raise SweepError(f"grid: {key}: the base recipe's {where} is {nxt!r}, not a mapping; set {where} itself instead")
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)
    return out


def label(value: Any) -> str:
    """A short folder-safe label of a grid value: scalars as written (a model's last path part),
    mappings by their scalar values (``{preset: int4_gptq, act_order: true}`` -> int4_gptq-true)."""
    if isinstance(value, dict):
        text = "-".join(label(v) for v in value.values() if not isinstance(v, (dict, list)))
        text = text or hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    elif isinstance(value, list):
        text = "-".join(label(v) for v in value)
    elif isinstance(value, str) and "/" in value:
        text = value.rstrip("/").rsplit("/", 1)[-1]
    else:
        text = str(value).lower() if isinstance(value, bool) else str(value)
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace("builtin:", "")).strip("-.")
    return text[:40] or "x"


def expand(spec: SweepSpec, sweep_dir: str | Path = ".", source: str = "<sweep>") -> list[Variant]:
    """Every variant of the grid (the product of its axes, in file order), each a validated recipe
    named after the values of the axes that vary, written to ``OUTPUT/variants/<name>``."""
    base = base_recipe_data(spec, sweep_dir)
    keys = list(spec.grid)
    varying = [k for k in keys if len(spec.grid[k]) > 1]
    points = list(itertools.product(*(spec.grid[k] for k in keys)))
    names = ["-".join(label(dict(zip(keys, p))[k]) for k in varying) or spec.name for p in points]
    seen: dict[str, int] = {}
    out = []
    for point, name in zip(points, names):
        if names.count(name) > 1:  # two values with the same label: number them in grid order
            seen[name] = seen.get(name, 0) + 1
            name = f"{name}-{seen[name]}"
        data = base
        for k, v in zip(keys, point):
            data = set_dotted(data, k, v)
        data = {**data, "name": name, "output": str(variants_dir(spec) / name)}
        recipe = parse_recipe(data, f"{source} (variant {name})")
        out.append(Variant(name=name, recipe=recipe, overrides=dict(zip(keys, point))))
    return out


def read_manifest(folder: Path) -> dict | None:
    try:
        data = json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(variant: Variant) -> bool:
    """Resume: the variant's folder holds a manifest of this very recipe, and every artifact
    it lists is there with its recorded size (a cheap guard against files removed by hand)."""
    manifest = read_manifest(variant.out)
    if manifest is None or not isinstance(manifest.get("recipe"), dict):
        return False
    if recipe_hash(manifest["recipe"]) != variant.recipe_hash:
        return False
    for a in manifest.get("artifacts", []):
        p = variant.out / a["path"]
        if not p.is_file() or p.stat().st_size != a["bytes"]:
            return False
    return True


def text_gguf(manifest: dict) -> dict | None:
    """The text model's GGUF among a manifest's artifacts (``path``, ``bytes``, ``sha256``);
    the vision projector (``mmproj-*``) is not what llama.cpp evaluates on its own."""
    for a in manifest.get("artifacts", []):
        name = Path(a["path"]).name
        if name.endswith(".gguf") and not name.startswith("mmproj-"):
            return a
    return None


def eval_is_done(path: Path, gguf_sha256: str, spec: SweepSpec) -> bool:
    """Resume of an evaluation: its results file is of this very GGUF with these settings."""
    try:
        r = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    s = r.get("settings", {}) if isinstance(r, dict) else {}
    return (r.get("artifact", {}).get("sha256") == gguf_sha256 and s.get("n_windows") == spec.eval.n_windows
            and s.get("seq_len") == spec.eval.seq_len)


def task_memory(artifact_bytes: int, checkpoint_bytes: int, calibrates: bool) -> int:
    """Bytes a quantize task asks Ray for (the formula above), rounded up to MiB."""
    total = TASK_BASE_BYTES + artifact_bytes + (checkpoint_bytes if calibrates else 0)
    return -(-total // (1 << 20)) * (1 << 20)


def task_resources(recipe: Recipe, spec: SweepSpec, artifact_bytes: int, checkpoint_bytes: int, calibrates: bool) -> dict:
    """Ray options of a quantize task: CPUs from the sweep, a GPU when the recipe runs on CUDA,
    memory from the dry run's predictions."""
    return {
        "num_cpus": spec.cpus_per_task,
        "num_gpus": 1 if recipe.device.startswith("cuda") else 0,
        "memory": task_memory(artifact_bytes, checkpoint_bytes, calibrates),
    }


def reference_memory(checkpoint_bytes: int) -> int:
    return EVAL_BASE_BYTES + 2 * checkpoint_bytes


def eval_memory(gguf_bytes: int) -> int:
    return EVAL_BASE_BYTES + gguf_bytes


def feasible(request: dict, node_totals: list[dict]) -> bool:
    """Whether some node's total resources cover ``request`` (zero amounts ask for nothing)."""
    need = {k: v for k, v in request.items() if v}
    return any(all(node.get(k, 0) >= v for k, v in need.items()) for node in node_totals)


def flat_request(options: dict) -> dict:
    """Ray task options as the resource names nodes report (``CPU``, ``GPU``, ``memory``, custom)."""
    out = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0), "memory": options.get("memory", 0)}
    out.update(options.get("resources") or {})
    return out
