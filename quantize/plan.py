"""The plan: every tensor of the checkpoint, its tower, its scheme and its bytes, before any
weight is read.

Scheme resolution, in order: 1-D tensors are never quantized; ``ignore`` globs keep a tensor;
the last matching ``overrides`` entry wins; otherwise the tower's default. Then the KV-sharing
rule: a producer's k_proj feeds every consumer's keys and its v_proj every consumer's values.
K and V are separate tensors with separate caches, so they may have different schemes (llama.cpp's
own mixes give ``attn_v`` more bits than ``attn_k``); only consistency within a group matters.
For K and for V separately:

- explicit overrides of that projection (k_proj or v_proj) on layers of one group that disagree
  are refused (``PlanError`` naming the group);
- an explicit override sets the producer's projection (an override on the producer's k_proj
  sets K only);
- otherwise the producer's projection gets the highest precision that any layer of the group
  asks for (a consumer asks through its own attention's scheme, i.e. its q_proj scheme).

Consumers' dead k/v (present in Google's checkpoints) are marked ``dead``: never calibrated,
never quantized, written only where a format requires them (llama.cpp's GGUF).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

from quantize.errors import PlanError
from quantize.model import TOWERS, Checkpoint, KVGroup, glob_match, is_dead_kv, layer_index, tower_of
from quantize.recipe import Recipe
from quantize.schemes import QuantScheme, precision_rank, resolve_scheme

KEEP = resolve_scheme("keep")
CALIBRATED_METHODS = ("gptq", "awq")  # run by the sequential calibration, on text-decoder linears only
_KV_RE = re.compile(r"self_attn\.(k_proj|v_proj)\.weight$")


@dataclass(frozen=True)
class PlanEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    tower: str
    layer: int | None
    scheme: QuantScheme
    reason: str  # why this scheme: "tower text", "override 2", "ignore", "1-D", "kv group ..."
    dead: bool = False
    bytes_before: int = 0

    @property
    def quantized(self) -> bool:
        return self.scheme.is_quantized and not self.dead

    @property
    def bytes_after(self) -> int:
        if self.dead:
            return 0
        bpe = self.bytes_before // max(1, _numel(self.shape))
        return self.scheme.bytes_for(self.shape, bpe)


@dataclass(frozen=True)
class Plan:
    entries: tuple[PlanEntry, ...]
    kv_groups: tuple[KVGroup, ...]
    notes: tuple[str, ...] = field(default=())

    def __getitem__(self, name: str) -> PlanEntry:
        return self.by_name[name]

    @cached_property
    def by_name(self) -> dict[str, PlanEntry]:
        # Built once: writers look up every tensor by name (a dict per lookup was quadratic).
        return {e.name: e for e in self.entries}

    def tower_totals(self) -> dict[str, dict]:
        out = {t: {"tensors": 0, "params": 0, "bytes_before": 0, "bytes_after": 0, "schemes": set()} for t in TOWERS}
        for e in self.entries:
            t = out[e.tower]
            t["tensors"] += 1
            t["params"] += _numel(e.shape)
            t["bytes_before"] += e.bytes_before
            t["bytes_after"] += e.bytes_after
            t["schemes"].add("dead k/v (dropped)" if e.dead else e.scheme.label())
        return {k: v for k, v in out.items() if v["tensors"]}

    def to_json(self) -> dict:
        return {
            "tensors": [
                {
                    "name": e.name,
                    "shape": list(e.shape),
                    "tower": e.tower,
                    "scheme": e.scheme.label(),
                    "reason": e.reason,
                    "dead": e.dead,
                    "bytes_before": e.bytes_before,
                    "bytes_after": e.bytes_after,
                }
                for e in self.entries
            ],
            "kv_groups": [g.describe() for g in self.kv_groups],
            "notes": list(self.notes),
        }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _override_for(name: str, recipe: Recipe) -> tuple[int, QuantScheme] | None:
    hit = None
    for i, o in enumerate(recipe.overrides):
        if glob_match(name, o.match):
            hit = (i, o.scheme)
    return hit


def build_plan(recipe: Recipe, ckpt: Checkpoint) -> Plan:
    consumers = ckpt.consumers
    entries: dict[str, PlanEntry] = {}
    explicit_kv: dict[str, tuple[int, QuantScheme]] = {}
    for info in ckpt.tensors.values():
        name, ndim = info.name, len(info.shape)
        tower = tower_of(name, ndim)
        dead = is_dead_kv(name, consumers)
        override = _override_for(name, recipe)
        if tower == "norms":
            scheme, reason = KEEP, "1-D (never quantized)"
        elif glob_match(name, recipe.ignore):
            scheme, reason = KEEP, "ignore"
        elif override is not None:
            scheme, reason = override[1], f"override {override[0]}"
        else:
            scheme, reason = getattr(recipe.towers, tower), f"tower {tower}"
        if override is not None and _KV_RE.search(name):
            explicit_kv[name] = override
        if tower != "text" and scheme.is_quantized and scheme.method in CALIBRATED_METHODS:
            # a quantized scheme here is the override's (ignore and 1-D give keep) or the tower's
            where = f"overrides[{override[0]}]" if override is not None else f"towers.{tower}"
            raise PlanError(f"{name}: {where} asks for method {scheme.method!r}, which only text-decoder linears "
                            f"run (this tensor is in tower {tower!r}); give it method 'rtn' (importance: true "
                            f"weighs its scales)")
        if dead:
            reason = "dead k/v of a KV-consumer layer"
        entries[name] = PlanEntry(
            name, info.shape, info.dtype, tower, layer_index(name), scheme, reason, dead, info.nbytes
        )

    notes = list(_apply_kv_groups(entries, explicit_kv, ckpt.kv_groups, ckpt))
    return Plan(tuple(entries.values()), tuple(ckpt.kv_groups), tuple(notes))


def _layer_name(ckpt_names, layer: int, leaf: str) -> str | None:
    suffix = f"language_model.layers.{layer}.self_attn.{leaf}.weight"
    for n in ckpt_names:
        if n.endswith(suffix):
            return n
    return None


def _apply_kv_groups(entries: dict[str, PlanEntry], explicit_kv, groups, ckpt: Checkpoint):
    names = list(entries)
    for g in groups:
        asks = []
        for layer in g.consumers:
            q = _layer_name(names, layer, "q_proj")
            if q is not None:
                asks.append(entries[q].scheme)
        # K and V are resolved independently: the producer's k_proj feeds only the keys.
        for leaf in ("k_proj", "v_proj"):
            explicit: dict[str, QuantScheme] = {}
            for layer in g.layers:
                n = _layer_name(names, layer, leaf)
                if n is not None and n in explicit_kv:
                    explicit[n] = explicit_kv[n][1]
            if len({s.label() for s in explicit.values()}) > 1:
                detail = "; ".join(f"{n}: {s.label()}" for n, s in sorted(explicit.items()))
                raise PlanError(
                    f"KV-sharing group ({g.describe()}) gets conflicting {leaf} schemes: {detail}. "
                    f"Layer {g.producer}'s {leaf} feeds every layer of the group, so give them one scheme"
                )
            prod = _layer_name(names, g.producer, leaf)
            if prod is None:
                continue
            if explicit:
                target, why = next(iter(explicit.values())), f"explicit {leaf} override"
            else:
                target = max([entries[prod].scheme, *asks], key=precision_rank)
                why = "highest precision asked in the group"
            e = entries[prod]
            if e.scheme != target:
                entries[prod] = PlanEntry(
                    e.name, e.shape, e.dtype, e.tower, e.layer, target,
                    f"kv group {g.producer}->{','.join(map(str, g.consumers))}: {why}", e.dead, e.bytes_before,
                )
                yield f"layer {g.producer} {leaf} set to {target.label()} ({why}; group {g.describe()})"


def format_plan(plan: Plan) -> str:
    """Human-readable dry-run output: per-tower totals, KV groups, dead tensors, notes."""
    lines = []
    head = f"{'tower':<22} {'tensors':>7} {'params':>12} {'bytes before':>14} {'bytes after':>14}  schemes"
    lines.append(head)
    lines.append("-" * len(head))
    tb = ta = 0
    for tower, t in plan.tower_totals().items():
        tb += t["bytes_before"]
        ta += t["bytes_after"]
        lines.append(
            f"{tower:<22} {t['tensors']:>7} {t['params']:>12,} {t['bytes_before']:>14,} {t['bytes_after']:>14,}  "
            + ", ".join(sorted(t["schemes"]))
        )
    lines.append(f"{'total':<22} {'':>7} {'':>12} {tb:>14,} {ta:>14,}  ({ta / max(tb, 1):.3f}x)")
    lines.append("")
    lines.append("KV-sharing groups (producer -> consumers):")
    for g in plan.kv_groups:
        lines.append(f"  {g.describe()}")
    dead = [e.name for e in plan.entries if e.dead]
    lines.append(f"dead k/v tensors in the checkpoint (not quantized; GGUF gets minimal placeholders): {len(dead)}")
    for n in plan.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)
