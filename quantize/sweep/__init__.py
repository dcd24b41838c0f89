"""Sweeps: a base recipe and a grid of overrides, each variant one Ray task, evaluated on the
devices of a Ray cluster.

Layout: ``spec`` (the strict SWEEP.yaml schema), ``variants`` (pure functions: grid expansion,
recipe hashes, resume checks, resource predictions), ``work`` (what a task does on its node,
without Ray: build a variant, build the KL base, evaluate a GGUF), ``files`` (shipping folders
through the object store and writing them atomically on the driver), ``ray_runner`` (the only
module that imports Ray: tasks, scheduling, progress, retries, Ctrl-C).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def load(path: str | Path):
    """The sweep file and its variants, every variant validated as a recipe."""
    from quantize.sweep.spec import load_sweep
    from quantize.sweep.variants import expand

    spec = load_sweep(path)
    return spec, expand(spec, Path(path).parent, str(path))


@dataclass(frozen=True)
class Build:
    """A variant as the sweep will treat it: ``options`` are its task's Ray resources, None when
    its folder already holds this recipe's output (a run skips it)."""

    variant: object
    options: dict | None
    artifact_bytes: int = 0
    checkpoint_bytes: int = 0
    calibrates: bool = False


def plan(spec, variants) -> list[Build]:
    """What a run will do with each variant, checked before Ray starts: a model, plan or output
    folder that cannot work fails here (one line), with nothing submitted and nothing written.
    Reads checkpoint headers only (the dry run's predictions size each task's memory)."""
    from quantize.atomic import check_output
    from quantize.sweep import variants as V
    from quantize.sweep.work import predict

    out = []
    for v in variants:
        if V.is_complete(v):
            out.append(Build(v, None))
            continue
        check_output(v.out)  # never replaces a folder the user put other files in
        artifact, checkpoint, calibrates = predict(v.recipe)
        out.append(Build(v, V.task_resources(v.recipe, spec, artifact, checkpoint, calibrates), artifact, checkpoint, calibrates))
    return out


def describe(spec, builds: list[Build]) -> str:
    """The dry run: each variant's grid values, what its task asks Ray for, or that a run skips it."""
    from quantize.sweep.variants import variants_dir

    lines = [f"sweep {spec.name}: {len(builds)} variant(s) -> {variants_dir(spec)}"]
    for b in builds:
        v = b.variant
        if b.options is None:
            lines.append(f"  {v.name}: skip (complete, recipe hash {v.recipe_hash[:12]})")
            continue
        r = b.options
        values = ", ".join(f"{k}={value!r}" for k, value in v.overrides.items()) or "the base recipe"
        calibrated = f", calibrated: + checkpoint {b.checkpoint_bytes:,} bytes" if b.calibrates else ""
        lines.append(f"  {v.name}: {values}; asks CPU {r['num_cpus']:g}, GPU {r['num_gpus']}, memory {r['memory'] / (1 << 30):.2f} GiB "
                     f"(predicted artifacts {b.artifact_bytes:,} bytes{calibrated})")
    if spec.eval is not None:
        for d in spec.eval.devices:
            lines.append(f"  eval on {d.name}: resources {d.resources}, llama.cpp on {d.device}")
    return "\n".join(lines)
