"""Sequential, layer-by-layer calibration and quantization of Gemma 3n's text decoder.

The model runs once up to its first decoder layer (embeddings, vision and audio towers, the
AltUp stream expansion, per-layer inputs, rotary tables and masks, all computed by the model's
own code, see ``capture_layer_inputs``). Then for each decoder layer in turn:

1. the layer is moved to ``device``; only its inputs for all calibration batches are alive;
2. AWQ scales (if asked) are searched on the float layer and absorbed where that is exact;
3. the layer runs on every batch with float weights; the outputs of the first batches (up to
   ``REFERENCE_TOKENS`` tokens; every ``REFERENCE_STRIDE``-th position of them, where alone the
   float MLP runs) are kept as the reference for the report's relative error;
4. "true sequential" stages: q/k/v (one shared input), o_proj, gate/up (one shared input),
   down_proj. For each stage the layer runs again with the earlier stages already quantized,
   up to the stage's input only (the first stage's inputs come from step 3's pass, which
   itself ends there for the batches past the reference), and
   hooks collect the stage's input statistics (Hessian for GPTQ, mean x^2 / mean |x| for
   importance RTN and AWQ), the stage's linears are quantized and their dequantized weights
   are written into the module, so the model computes the fake-quantized function;
5. the quantized layer's outputs replace its inputs, batch by batch, as the next layer's.

Steps 4 and 5 do not recompute what cannot have changed (``_MlpReuse``, within a memory bound):
the down stage runs the MLP alone on the MLP inputs kept from the gate/up stage's pass, and the
final pass applies down_proj to the down_proj inputs kept from the down stage's pass.

Gemma 3n specifics: the hidden state is AltUp's 4 streams (4, B, T, D); every layer gets its
slice of the per-layer inputs, the rotary table and mask of its attention type, and a
``KVSharingDict`` per batch that lives across layers: KV "store" layers write their K/V into it
when they run with quantized weights, and "reuse" (consumer) layers read it, so consumers are
calibrated on exactly the K/V the quantized producer computes, as at inference. Consumers have
no k/v modules, so their dead checkpoint weights are never seen here. Activation sparsity is
the model's own code and stays as it is.
"""
from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from quantize.errors import QuantizeError
from quantize.kv_cache import KVRange
from quantize.memory import release_free_memory, reuse_freed_memory
from quantize.methods.awq import absorb_into_linear, absorb_into_norm, awq_search
from quantize.methods.gptq import gptq_quantize_shared
from quantize.methods.rtn import quantize_rtn
from quantize.methods.stats import ActStats, HessianAccumulator
from quantize.qtensor import QuantizedTensor
from quantize.schemes import QuantScheme
from quantize.source import Rescale

log = logging.getLogger(__name__)

PREFIX = "model.language_model.layers"
# Stages in the order a layer computes them: (stage name, linears sharing one input).
STAGES = (
    ("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("attn_out", ("self_attn.o_proj",)),
    ("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp_out", ("mlp.down_proj",)),
)
LINEARS = tuple(m for _, ms in STAGES for m in ms)
# Calibration tokens whose float layer outputs score the report's rel_error: the float pass runs
# the whole layer (MLP included, at the REFERENCE_STRIDE positions) for these batches only (at
# least one batch). At 4 x 512 that is 1 of the 4 batches: 1024 took 2, 4096 all 4. 512 tokens
# (128 scored positions of 4 x 2048 values each) still give the error to a few digits; it is a
# report, the codes do not depend on it.
REFERENCE_TOKENS = 512
# The reference scores every REFERENCE_STRIDE-th position of those batches: everything from the
# MLP on is per position (gate/up/down, AltUp's correction, the per-layer input gate), so the
# float MLP runs on those positions only (a quarter of the reference batch's MLP, about 1.4 s
# per E4B layer on a 2-core AVX2 CPU); the attention before it still sees every position.
REFERENCE_STRIDE = 4
# Activations a layer may keep to skip recomputing its MLP (see _MlpReuse): E4B's down_proj
# inputs at 32 x 512 tokens are 1 GiB in fp32; the rest of the budget covers multimodal tokens.
MLP_REUSE_BYTES = 5 * 2**28
# A stage whose GPTQ linears all use act-order keeps its input rows instead of H while the
# tokens are at most its input width / LOW_RANK_DIVISOR: GPTQ then factors H in low-rank form
# (gptq._gptq_low_rank: 2 t^2 n + 2 rows t n multiply-adds, against the dense path's
# t n^2 / 2 + n^3 / 3 + rows n^2 / 2; at a quarter of the columns they cost the same for
# E4B's gate/up, whose 16384 rows make the rank-t updates dear, and the low-rank one 2.8x
# less for down_proj; at E4B's 4 x 512 tokens it is down_proj's path).
LOW_RANK_DIVISOR = 4
# o_proj inputs a layer may keep to skip recomputing its attention (see _AttnReuse): E4B's at
# 32 x 512 tokens are 128 MiB in fp32; the rest covers multimodal tokens.
ATTN_REUSE_BYTES = 2**28
# GPTQ linears of a stage with one scheme are quantized as one stack of rows (one factor, one
# column loop: gptq_quantize_shared) while the stack has at most this many rows: E4B's q/k/v
# (3072 rows) took 0.68 s instead of 1.24 s one by one; its gate/up (32768) were slower stacked.
GPTQ_STACK_ROWS = 8192
_NAME_RE = re.compile(r"^model\.language_model\.layers\.(\d+)\.(" + "|".join(re.escape(m) for m in LINEARS) + r")\.weight$")


class SequentialError(QuantizeError):
    """The schemes, batches or model given to the sequential engine do not fit together."""


@dataclass
class SequentialResult:
    """What the engine produced.

    - ``tensors``: a ``QuantizedTensor`` per quantized checkpoint name (a dict, or with
      ``spill`` the ``quantize.spill.SpilledTensors`` that holds them on disk);
    - ``updated``: float tensors the engine replaced (AWQ divides
      ``pre_feedforward_layernorm.weight`` by its scales); writers must take these instead of
      the checkpoint's values;
    - ``rescaled``: every linear whose float weight AWQ rescaled (gate/up/down, quantized or
      kept), as scale vectors (``quantize.source.Rescale``): kept ones are written, and GGUF
      types that re-encode floats encode, these weights, never the checkpoint's;
    - ``report``: per layer (int): seconds (``phase_s``: the same split into ``load``, ``awq``,
      ``statistics``, ``quantize``, ``final_pass`` and ``release``, see ``_PhaseClock``),
      methods, fallbacks, notes and the relative error of the quantized layer's output against
      the float layer on the same inputs (the first calibration batches, up to
      ``REFERENCE_TOKENS`` tokens, at every ``REFERENCE_STRIDE``-th position);
    - ``kv_scales``: with ``kv_fp8``, ``{producer layer: (k_scale, v_scale)}`` per KV-sharing
      group (shared by its consumers); ``layer_kv_scales`` has every layer's cache scales, the
      consumers' pointing at their producer's values.
    """

    tensors: Mapping[str, QuantizedTensor] = field(default_factory=dict)
    updated: dict[str, torch.Tensor] = field(default_factory=dict)
    rescaled: dict[str, Rescale] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    kv_scales: dict[int, tuple[float, float]] = field(default_factory=dict)
    # Mean squared input per column of each linear whose statistics were collected (on the
    # partly quantized layer), by checkpoint name: writers that re-encode (GGUF K-quant mixes)
    # weight their errors with it, as llama.cpp's imatrix does.
    importance: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_kv_scales: dict[int, tuple[float, float]] = field(default_factory=dict)


@dataclass
class _BatchContext:
    """Everything layer i needs for one batch besides the hidden states (shared by all layers)."""

    position_embeddings: dict  # layer type -> (cos, sin)
    masks: dict  # layer type -> mask (or None)
    per_layer_inputs: torch.Tensor  # (B, T, L, P)
    position_ids: torch.Tensor | None
    kwargs: dict
    shared_kv: object  # KVSharingDict: persists across layers


class _StopForward(Exception):
    """Ends a forward whose remaining work would be discarded: the capture's last recorder, and a
    statistics hook once it has its linear's input and the batch's output is not needed (for
    o_proj and gate/up that skips the MLP, AltUp's correction and the per-layer gate: about 90%
    of an E4B layer's multiply-adds). Never leaves this module."""


class _PhaseClock:
    """Seconds of one layer by phase. On CUDA each lap first waits for the kernels queued so far,
    so a phase is charged with its own GPU work and not with the next phase's (kernels run
    asynchronously; the wait costs one synchronisation per phase, a few per layer)."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        if self.device is not None:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now

    def report(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


def text_linear_name(layer: int, module: str) -> str:
    return f"{PREFIX}.{layer}.{module}.weight"


def validate_schemes(model, schemes: Mapping[str, QuantScheme]) -> dict[int, dict[str, QuantScheme]]:
    """Schemes grouped by layer and module path; unknown or absent (dead) names are refused."""
    layers = model.model.language_model.layers
    out: dict[int, dict[str, QuantScheme]] = {}
    for name, scheme in schemes.items():
        m = _NAME_RE.match(name)
        if not m:
            raise SequentialError(
                f"{name!r} is not a text-decoder linear; the sequential engine quantizes "
                f"{PREFIX}.N.{{{', '.join(LINEARS)}}}.weight only"
            )
        i, path = int(m.group(1)), m.group(2)
        if i >= len(layers):
            raise SequentialError(f"{name!r}: the model has {len(layers)} decoder layers")
        try:
            layers[i].get_submodule(path)
        except AttributeError:
            raise SequentialError(
                f"{name!r}: layer {i} has no {path} module (a KV-consumer layer's k/v are dead weights: "
                "they are never calibrated or quantized; leave them out of the schemes)"
            ) from None
        if not isinstance(scheme, QuantScheme):
            raise SequentialError(f"{name!r}: scheme must be a QuantScheme, got {type(scheme).__name__}")
        if scheme.is_quantized:
            out.setdefault(i, {})[path] = scheme
    return out


def _model_device(model) -> torch.device:
    return model.model.language_model.embed_tokens.weight.device


def _to(x, device, dtype: torch.dtype | None = None):
    """Tensors (in nested tuples/lists/dicts) to a device; floating ones also to ``dtype`` if given."""
    if isinstance(x, torch.Tensor):
        if dtype is not None and x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device, dtype) for v in x)
    if isinstance(x, list):
        return [_to(v, device, dtype) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, device, dtype) for k, v in x.items()}
    return x


@torch.no_grad()
def capture_layer_inputs(model, batches: Sequence[dict], device, dtype: torch.dtype = torch.float32,
                         streamed=None, progress: bool = False) -> tuple[list[torch.Tensor], list[_BatchContext]]:
    """Layer 0's hidden states and every layer's side inputs, per batch, from the model's own forward.

    Each decoder layer's ``forward`` is replaced for the duration by a recorder that keeps the
    arguments ``Gemma3nTextModel.forward`` passes and returns its input unchanged; the last
    layer's recorder stops the forward, so the norm and the LM head never run.
    ``streamed`` (a ``quantize.streamed_model.StreamedModel``): each tower is materialised from
    the first batch that runs it to the last, then released.
    """
    from tqdm.auto import tqdm
    from transformers.cache_utils import KVSharingDict

    lm = model.model.language_model
    layers = lm.layers
    types = lm.config.layer_types
    n = len(layers)
    seen: list = []

    def recorder(i):
        def forward(*args, **kwargs):
            seen.append((i, args, kwargs))
            if i == n - 1:
                raise _StopForward
            return args[0]
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    hidden, contexts = [], []
    src = _model_device(model)
    try:
        towers = _towers_per_batch(batches) if streamed is not None else []
        bar = tqdm(batches, desc="capturing layer-0 inputs", unit="batch", disable=not progress)
        for b, batch in enumerate(bar):
            if streamed is not None:
                _stage_towers(streamed, towers, b)
            if "input_ids" not in batch and "inputs_embeds" not in batch:
                raise SequentialError(f"calibration batch {b} has neither input_ids nor inputs_embeds (keys: {sorted(batch)})")
            inputs = {k: _to(v, src) for k, v in batch.items() if k != "labels"}
            seen.clear()
            try:
                model.model(**inputs, use_cache=False)
            except _StopForward:
                pass
            if len(seen) != n:
                raise SequentialError(f"calibration batch {b}: the forward reached {len(seen)} of {n} decoder layers")
            pe, masks = {}, {}
            for i, args, kwargs in seen:
                t = types[i]
                pe.setdefault(t, args[1] if len(args) > 1 else kwargs["position_embeddings"])
                masks.setdefault(t, kwargs.get("attention_mask"))
            _, args0, kw0 = seen[0]
            # Layer i reads per_layer_inputs[:, :, i, :]; stacking the slices back rebuilds it.
            pli = torch.stack([(a[2] if len(a) > 2 else kw["per_layer_input"]) for _, a, kw in seen], dim=2)
            extra = {k: v for k, v in kw0.items()
                     if k not in ("attention_mask", "position_ids", "shared_kv_states", "cache", "past_key_values",
                                  "position_embeddings", "per_layer_input")}
            hidden.append(args0[0].to(device=device, dtype=dtype))
            contexts.append(_BatchContext(
                position_embeddings=_to(pe, device, dtype),
                masks=_to(masks, device, dtype),
                per_layer_inputs=pli.to(device=device, dtype=dtype),
                position_ids=_to(kw0.get("position_ids"), device),
                kwargs=_to(extra, device, dtype),
                shared_kv=KVSharingDict(),
            ))
            seen.clear()
    finally:
        if streamed is not None:
            _stage_towers(streamed, [], 0)
        for layer in layers:
            if "forward" in layer.__dict__:
                del layer.forward
    return hidden, contexts


_TOWER_INPUTS = {"vision": "pixel_values", "audio": "input_features"}


def _towers_per_batch(batches: Sequence[dict]) -> list[set[str]]:
    return [{t for t, key in _TOWER_INPUTS.items() if batch.get(key) is not None} for batch in batches]


def _stage_towers(streamed, towers: list[set[str]], b: int) -> None:
    """Batch ``b``'s towers materialised; towers no later batch runs released."""
    later = set().union(*towers[b:]) if b < len(towers) else set()
    for t in _TOWER_INPUTS:
        if t in (towers[b] if b < len(towers) else set()):
            streamed.load_tower(t)
        elif t not in later:
            streamed.release_tower(t)


class _MlpReuse:
    """Skips the MLP recomputations of a layer's later passes (results unchanged, bit for bit).

    Once q/k/v/o are quantized, the MLP's input no longer changes, and once gate/up are
    quantized neither does down_proj's input. So the gate/up stage's pass keeps each batch's
    MLP input; the down stage then runs the MLP alone on it (instead of the whole layer up to
    down_proj) and keeps down_proj's inputs; the final pass takes ``down_proj(kept input)`` for
    the MLP's output instead of recomputing gate, up and the activation (about 60% of an E4B
    layer's multiply-adds). The kept tensors are the very ones the full passes compute, on the
    same weights. Memory: at most ``budget`` bytes of kept activations at any time; the MLP
    inputs are kept only if all of them fit, down_proj's inputs batch by batch while they fit
    (the rest are recomputed as before)."""

    def __init__(self, hidden: Sequence[torch.Tensor], budget: int):
        self.budget = budget
        n = len(hidden)
        self.mlp_in: list[torch.Tensor | None] = [None] * n
        self.down_in: list[torch.Tensor | None] = [None] * n
        self.batch = 0  # the batch the layer is running now (set by the passes)
        x_bytes = sum(_tokens(h) * h.shape[-1] * h.element_size() for h in hidden)
        self.keep_mlp_in = x_bytes <= budget

    def _held(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.mlp_in, *self.down_in) if t is not None)

    def mlp_in_hook(self, _m, args) -> None:
        """gate_proj's pre-hook in the gate/up stage's pass."""
        if self.keep_mlp_in:
            self.mlp_in[self.batch] = args[0]

    def down_in_hook(self, _m, args) -> None:
        """down_proj's pre-hook in the down stage's pass."""
        x = args[0]
        if self._held() + x.numel() * x.element_size() <= self.budget:
            self.down_in[self.batch] = x

    def has_mlp_inputs(self) -> bool:
        return self.keep_mlp_in and all(t is not None for t in self.mlp_in)

    def run_mlp(self, mlp) -> None:
        """The down stage's pass: the MLP on each kept input, up to down_proj's pre-hooks (the
        statistics hook ends it there)."""
        for b in range(len(self.mlp_in)):
            self.batch = b
            x, self.mlp_in[b] = self.mlp_in[b], None  # held no longer than needed
            try:
                mlp(x)
            except _StopForward:
                pass

    def final_forward(self, mlp):
        """Installs, for the final pass, an MLP forward that uses a kept down_proj input where
        there is one (and frees it); returns the function that removes it."""
        original = type(mlp).forward

        def forward(hidden_states):
            d, self.down_in[self.batch] = self.down_in[self.batch], None
            return original(mlp, hidden_states) if d is None else mlp.down_proj(d)

        mlp.forward = forward

        def remove() -> None:
            del mlp.forward
            self.mlp_in = [None] * len(self.mlp_in)
            self.down_in = [None] * len(self.down_in)

        return remove


class _AttnReuse:
    """Skips the attention recomputations of a layer's later passes (results unchanged, bit for bit).

    Once q/k/v are in their final (quantized) state, o_proj's input no longer changes within the
    layer: it depends on the layer's input, q/k/v's weights and, in a KV consumer, on the K/V its
    producer stored before this layer ran. So from the first pass after the q/k/v stage, each
    batch's o_proj input is kept, and later passes (the gate/up stage's, a down stage's that has
    no kept MLP inputs, the final one) take ``o_proj(kept input)`` for the attention's output,
    skipping q/k/v, their norms, RoPE and the attention (about 9% of an E4B layer's
    multiply-adds, run twice more per layer without this). A store layer's K/V stay in the
    shared dicts as that first pass wrote them, from the same weights on the same input, so its
    consumers read what the final pass used to write. ``serve = False`` runs the attention in
    full (the final pass of a layer whose k/v the kv_fp8 hooks must see). Memory: o_proj
    inputs batch by batch while they fit in ``budget`` bytes (the rest recompute as before)."""

    def __init__(self, attn, n_batches: int, budget: int):
        self.attn = attn
        self.budget = budget
        self.kept: list[torch.Tensor | None] = [None] * n_batches
        self.batch = 0  # the batch the layer is running now (set by the passes)
        self.serve = True
        self._hook = None

    def _keep(self, _m, args) -> None:
        x = args[0]
        held = sum(t.numel() * t.element_size() for t in self.kept if t is not None)
        if self.kept[self.batch] is None and held + x.numel() * x.element_size() <= self.budget:
            self.kept[self.batch] = x

    def install(self) -> None:
        """From the next pass on (call it once q/k/v are final, before later hooks on o_proj:
        pre-hooks run in the order they were registered, and a statistics hook ends the pass)."""
        original = type(self.attn).forward
        attn = self.attn

        def forward(*args, **kwargs):
            kept = self.kept[self.batch] if self.serve else None
            return original(attn, *args, **kwargs) if kept is None else (attn.o_proj(kept), None)

        attn.forward = forward
        self._hook = attn.o_proj.register_forward_pre_hook(self._keep)

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            del self.attn.forward
            self._hook = None
        self.kept = [None] * len(self.kept)


@contextmanager
def _mlp_at_positions(mlp, stride: int):
    """The MLP computes every ``stride``-th position only (the others' outputs are 0): for the
    float reference, whose layer outputs are scored at those positions only (``_scored``)."""
    if stride == 1:
        yield
        return
    original = type(mlp).forward

    def forward(x):
        out = torch.zeros_like(x)  # (batch, positions, width): the MLP keeps the width
        out[:, ::stride] = original(mlp, x[:, ::stride])
        return out

    mlp.forward = forward
    try:
        yield
    finally:
        del mlp.forward


def _scored(out: torch.Tensor) -> torch.Tensor:
    """The positions of a layer output (AltUp streams, batch, positions, width) that the
    report's rel_error compares (see REFERENCE_STRIDE)."""
    return out[:, :, ::REFERENCE_STRIDE].contiguous()


def _tokens(h: torch.Tensor) -> int:
    """Tokens of one batch's hidden state (AltUp streams, batch, time, width)."""
    return h.shape[1] * h.shape[2]


def run_layer(layer, i: int, layer_type: str, h: torch.Tensor, ctx: _BatchContext) -> torch.Tensor:
    """One decoder layer on one batch, with exactly the arguments Gemma3nTextModel.forward passes."""
    return layer(
        h,
        ctx.position_embeddings[layer_type],
        ctx.per_layer_inputs[:, :, i, :],
        shared_kv_states=ctx.shared_kv,
        attention_mask=ctx.masks[layer_type],
        position_ids=ctx.position_ids,
        cache=None,
        **ctx.kwargs,
    )


def _collect(layer, run_all, module_paths: Sequence[str], hessian: bool, stop: Callable[[], bool] | None = None,
             low_rank: bool = False) -> dict[str, tuple[ActStats, HessianAccumulator | None]]:
    """Input statistics of the given linears (each read by a forward pre-hook) over all batches.
    ``low_rank``: the Hessians may be kept as input rows (see LOW_RANK_DIVISOR).

    ``stop`` (one linear only): asked after each input is recorded; True ends that batch's
    forward there (``run_all`` knows whether it needs the batch's output). The statistics are
    those of the full forward, which computes the same input first."""
    if stop is not None and len(module_paths) != 1:
        raise ValueError("stop: a pass can end at one linear's input, not several")
    stats = {}
    handles = []
    for path in module_paths:
        mod = layer.get_submodule(path)
        cols = mod.in_features
        dev = mod.weight.device
        rows_up_to = cols // LOW_RANK_DIVISOR if low_rank else 0
        st = (ActStats(cols, dev), HessianAccumulator(cols, dev, rows_up_to=rows_up_to) if hessian else None)
        stats[path] = st

        def hook(_m, args, st=st):
            x = args[0]
            st[0].add(x)
            if st[1] is not None:
                st[1].add(x)
            if stop is not None and stop():
                raise _StopForward
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        run_all()
    finally:
        for hd in handles:
            hd.remove()
    return stats


def _stacks(layer, todo: Sequence[str], wanted: Mapping[str, QuantScheme]) -> list[list[str]]:
    """The stage's linears in groups quantized together: neighbours with one GPTQ scheme, up
    to GPTQ_STACK_ROWS rows (see there); every other linear alone."""
    groups: list[list[str]] = []
    total = 0
    for p in todo:
        rows = layer.get_submodule(p).out_features
        if groups and wanted[p].method == "gptq" and wanted[groups[-1][0]] == wanted[p] and total + rows <= GPTQ_STACK_ROWS:
            groups[-1].append(p)
            total += rows
        else:
            groups.append([p])
            total = rows
    return groups


def _quantize_group(names: Sequence[str], weights: Sequence[torch.Tensor], scheme: QuantScheme, st,
                    last: bool) -> list[QuantizedTensor]:
    """Linears of one stage under one scheme (several only for GPTQ: see _stacks). ``last``: no
    later linear of the stage reads ``st``'s Hessian, so GPTQ may work in its memory."""
    acts, hess = st if st is not None else (None, None)
    importance = acts.mean_sq.cpu() if (acts is not None and scheme.importance) else None
    if scheme.method == "gptq":
        if hess is None or hess.n == 0:
            out = []
            for name, weight in zip(names, weights):
                qt = quantize_rtn(name, weight.cpu(), scheme, importance=importance)
                qt.info["fallback"] = "rtn: no calibration tokens reached this linear"
                out.append(qt)
            return out
        rows = hess.gram()  # the input rows while there are few tokens (see LOW_RANK_DIVISOR)
        return gptq_quantize_shared(names, weights, rows if rows is not None else hess.hessian(), scheme, consume=last)
    return [quantize_rtn(name, weight.detach().cpu(), scheme, importance=importance) for name, weight in zip(names, weights)]


@torch.no_grad()
def quantize_text_decoder(
    model,
    schemes: Mapping[str, QuantScheme],
    batches: Sequence[dict],
    device: str | torch.device = "cpu",
    kv_fp8: bool = False,
    progress: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    streamed=None,
    spill=None,
) -> SequentialResult:
    """Calibrate and quantize the text decoder's linears layer by layer (see the module doc).

    ``model``: a loaded ``Gemma3nForConditionalGeneration``; its decoder weights are replaced in
    place by their fake-quantized values. ``schemes``: checkpoint name -> scheme for the linears
    to quantize here (others stay as they are). ``batches``: model input dicts.
    ``compute_dtype``: the layer being calibrated and the activations passed between layers use
    it (fp32: a bf16 model is upcast one layer at a time, so the propagated fake-quantized
    function stays fp32; bf16: the layer is run as stored, faster matmuls where the hardware has
    bf16 instructions, and the fake-quantized weights the next layers see are ``codes * scale`` rounded
    to bf16). Hessians and importance are accumulated in fp32 either way. The layer goes back
    to its own dtype afterwards, where ``codes * scale`` may round: the returned
    ``QuantizedTensor``s are exact regardless.
    ``streamed``: the ``quantize.streamed_model.StreamedModel`` that ``model`` belongs to; each
    decoder layer is then read from the checkpoint just before it is calibrated and released
    after its quantized outputs are computed (one layer's weights resident, not the model's).
    ``spill``: a ``quantize.spill.SpilledTensors``; each finished layer's quantized tensors are
    written to it (and ``result.tensors`` is it) instead of accumulating in memory.
    """
    from quantize.compat import check_transformers

    if not batches:
        raise SequentialError("no calibration batches: the sequential engine needs at least one")
    check_transformers()
    from quantize.device import calibration_device, exact_cuda_math
    from quantize.errors import RecipeError

    try:
        device = calibration_device(device)  # cuda:N checked against the GPUs torch sees
    except RecipeError as e:
        raise SequentialError(str(e)) from None
    by_layer = validate_schemes(model, schemes)
    # Each layer frees and allocates the same large blocks (weights copies, Hessians, GPTQ's
    # workspace, activations): from the heap they are reused instead of faulting in fresh pages
    # (quantize.memory); every free page goes back when the loop ends.
    with exact_cuda_math(device), reuse_freed_memory():
        return _quantize_layers(model, by_layer, batches, device, kv_fp8, progress, compute_dtype, streamed, spill)


def _quantize_layers(model, by_layer, batches, device, kv_fp8, progress, compute_dtype, streamed, spill) -> SequentialResult:
    """``quantize_text_decoder``'s work on validated arguments."""
    from tqdm.auto import tqdm

    model.eval()
    lm = model.model.language_model
    cfg = lm.config
    types = cfg.layer_types
    modes = cfg.kv_sharing_modes if hasattr(cfg, "kv_sharing_modes") else ["own"] * len(lm.layers)
    result = SequentialResult(tensors=spill if spill is not None else {})

    hidden, contexts = capture_layer_inputs(model, batches, device, compute_dtype, streamed=streamed, progress=progress)
    # The report's relative output error is measured on the first batches up to REFERENCE_TOKENS
    # tokens (at least one batch): their float outputs wait for the final pass, so this bounds
    # that copy whatever the calibration size (2 of E4B's 4 x 512 or 32 x 512 batches).
    n_ref, seen = 0, 0
    while n_ref < len(hidden) and (n_ref == 0 or seen + _tokens(hidden[n_ref]) <= REFERENCE_TOKENS):
        seen += _tokens(hidden[n_ref])
        n_ref += 1
    kv_ranges: dict[int, KVRange] = {}
    producer_of_type: dict[str, int] = {}

    bar = tqdm(range(len(lm.layers)), desc="quantizing text decoder", unit="layer", disable=not progress)
    for i in bar:
        clock = _PhaseClock(device)
        layer = lm.layers[i]
        if streamed is not None:
            streamed.load_layer(i)
        # device and dtype only: a reference to the Parameter would keep its GPU copy alive
        home_device, home_dtype = layer.self_attn.q_proj.weight.device, layer.self_attn.q_proj.weight.dtype
        layer.to(device=device, dtype=compute_dtype)
        clock.lap("load")
        lt = types[i]
        wanted = by_layer.get(i, {})
        rep = {"methods": {}, "fallbacks": {}, "notes": []}
        done: dict[str, QuantizedTensor] = {}  # this layer's results

        needs_output = [True]  # whether the batch running now needs the layer's output (set by run_all)
        reuse = _MlpReuse(hidden, MLP_REUSE_BYTES)
        attn_reuse = _AttnReuse(layer.self_attn, len(hidden), ATTN_REUSE_BYTES)

        def output_unused() -> bool:
            return not needs_output[0]

        def run_all(store: list | None = None, kv: KVRange | None = None, final: list | None = None) -> float:
            """``store``: keeps the outputs of the first ``n_ref`` batches (the float reference).
            ``final`` (that reference): the final pass; each output replaces its batch's input
            (no second set of hidden states) and the relative error against the reference's
            batches is returned (their memory freed as they are scored)."""
            num = den = 0.0
            for b, ctx in enumerate(contexts):
                ref_batch = store is not None and b < n_ref
                needs_output[0] = final is not None or kv is not None or ref_batch
                reuse.batch = attn_reuse.batch = b
                try:
                    with _mlp_at_positions(layer.mlp, REFERENCE_STRIDE) if ref_batch else nullcontext():
                        out = run_layer(layer, i, lt, hidden[b], ctx)
                except _StopForward:  # a statistics hook has its input; this output is not needed
                    continue
                if ref_batch:
                    store.append(_scored(out))
                if final is not None:
                    if b < len(final):
                        # in fp32: a bf16 sum keeps 3 digits
                        num += float(((_scored(out).float() - final[b].float()) ** 2).sum())
                        den += float((final[b].float() ** 2).sum())
                        final[b] = None
                    hidden[b] = out
                if kv is not None and modes[i] == "store":
                    kv.add(*ctx.shared_kv[lt])
            return math.sqrt(num / den) if den > 0 else 0.0

        if _awq(layer, i, wanted, run_all, result, rep):
            clock.lap("awq")
        reference: list[torch.Tensor | None] = []
        first_stats = None
        stage0 = [p for p in STAGES[0][1] if p in wanted]
        if stage0:
            # batches past the reference end at q_proj's input (2 of 4 at 4 x 512)
            first_stats = _collect(layer, lambda: run_all(reference), [STAGES[0][1][0]], _needs_hessian(wanted, stage0),
                                   stop=output_unused, low_rank=_low_rank(wanted, stage0))
        elif wanted:
            run_all(reference)
        clock.lap("statistics")
        down_needs_pass = "mlp.down_proj" in wanted and _needs_stats(wanted, ["mlp.down_proj"])
        try:
            for s_idx, (stage, paths) in enumerate(STAGES):
                if s_idx == 1:  # q/k/v are final from here on
                    attn_reuse.install()
                todo = [p for p in paths if p in wanted]
                if not todo:
                    continue
                if s_idx == 0:
                    st = first_stats[paths[0]]
                elif _needs_stats(wanted, todo):
                    # hooks registered before _collect's run first (its hook ends the pass)
                    keep = None
                    if stage == "mlp_in" and down_needs_pass:
                        keep = layer.mlp.gate_proj.register_forward_pre_hook(reuse.mlp_in_hook)
                    elif stage == "mlp_out":
                        keep = layer.mlp.down_proj.register_forward_pre_hook(reuse.down_in_hook)
                    run, stop = run_all, output_unused
                    if stage == "mlp_out" and reuse.has_mlp_inputs():  # no batch's output is needed there
                        run, stop = (lambda: reuse.run_mlp(layer.mlp)), (lambda: True)
                    try:
                        st = _collect(layer, run, [paths[0]], _needs_hessian(wanted, todo), stop=stop,
                                      low_rank=_low_rank(wanted, todo))[paths[0]]
                    finally:
                        if keep is not None:
                            keep.remove()
                else:
                    st = None
                clock.lap("statistics")
                for group in _stacks(layer, todo, wanted):
                    mods = [layer.get_submodule(p) for p in group]
                    scheme = wanted[group[0]]
                    qts = _quantize_group([text_linear_name(i, p) for p in group], [m.weight.data for m in mods],
                                          scheme, st, last=group[-1] == todo[-1])
                    for p, mod, qt in zip(group, mods, qts):
                        mod.weight.data.copy_(qt.dequantize().to(device=mod.weight.device, dtype=mod.weight.dtype))
                        done[qt.name] = qt
                        if st is not None:
                            result.importance[qt.name] = st[0].mean_sq.detach().cpu()
                        rep["methods"][p] = scheme.label()
                        if "fallback" in qt.info:
                            rep["fallbacks"][p] = qt.info["fallback"]
                    qts = None
                clock.lap("quantize")
            # This layer's statistics (a down_proj Hessian is 1 GiB on E4B) go before its final
            # pass and the next layer: memory holds one layer's state, not two.
            first_stats = st = None
            # Final pass: the quantized layer's outputs feed the next layer (each replacing its
            # batch's input: one set of hidden states alive, 512 MiB at E4B's 32 x 512 tokens).
            # A store layer's quantized K/V are in the shared dicts for its consumers, written
            # by the first pass after the q/k/v stage (this one where no earlier pass ran).
            kv = None
            if kv_fp8 and modes[i] != "reuse":
                kv = kv_ranges.setdefault(i, KVRange())
            handles = _kv_hooks(layer, contexts, lt, kv) if kv is not None and modes[i] != "store" else []
            remove_mlp_reuse = reuse.final_forward(layer.mlp)
            attn_reuse.serve = not handles  # the kv_fp8 hooks read k/v as the attention computes them
            try:
                rep["rel_error"] = run_all(kv=kv if not handles else None, final=reference)
            finally:
                remove_mlp_reuse()
                for hd in handles:
                    hd.remove()
        finally:
            attn_reuse.remove()
        clock.lap("final_pass")
        if modes[i] == "store":
            producer_of_type[lt] = i
        if streamed is not None:
            streamed.release_layer(i)
        else:
            layer.to(device=home_device, dtype=home_dtype)
        if spill is not None:
            spill.add(done)
        else:
            result.tensors.update(done)
        done = qt = None  # the codes live in the result (or on disk) only
        release_free_memory()  # else the freed layer's heap pages stay resident (quantize.memory)
        clock.lap("release")
        rep["seconds"] = round(clock.last - clock.start, 3)
        rep["phase_s"] = clock.report()
        result.report[i] = rep
        for p, why in rep["fallbacks"].items():
            log.warning("layer %d %s: %s", i, p, why)

    if kv_fp8:
        for i, r in kv_ranges.items():
            result.layer_kv_scales[i] = r.scales()
        for i, mode in enumerate(modes):
            if mode == "store":
                result.kv_scales[i] = result.layer_kv_scales[i]
            elif mode == "reuse":
                result.layer_kv_scales[i] = result.layer_kv_scales[producer_of_type[types[i]]]
    return result


def _needs_hessian(wanted: Mapping[str, QuantScheme], paths) -> bool:
    return any(wanted[p].method == "gptq" for p in paths)


def _low_rank(wanted: Mapping[str, QuantScheme], paths) -> bool:
    """Whether GPTQ can read the stage's Hessian as input rows (act-order only: see gptq_quantize)."""
    return all(wanted[p].act_order for p in paths if wanted[p].method == "gptq")


def _needs_stats(wanted: Mapping[str, QuantScheme], paths) -> bool:
    return any(wanted[p].method == "gptq" or wanted[p].importance for p in paths)


def _kv_hooks(layer, contexts, layer_type, kv: KVRange):
    """K/V ranges of a layer that keeps its own cache: k after k_norm and RoPE, v after v_norm."""
    from transformers.models.gemma3n.modeling_gemma3n import apply_rotary_pos_emb

    attn = layer.self_attn
    pending = {}
    batch_idx = {"b": -1}

    def pre(_m, args, kwargs):
        batch_idx["b"] += 1

    def k_hook(_m, _a, out):
        cos, sin = contexts[batch_idx["b"]].position_embeddings[layer_type]
        pending["k"] = apply_rotary_pos_emb(out, cos, sin, unsqueeze_dim=2)

    def v_hook(_m, _a, out):
        kv.add(pending.pop("k"), out)

    return [
        attn.register_forward_pre_hook(pre, with_kwargs=True),
        attn.k_norm.register_forward_hook(k_hook),
        attn.v_norm.register_forward_hook(v_hook),
    ]


# The linears AWQ can rescale in Gemma 3n (see quantize.methods.awq): their scales are absorbed
# by pre_feedforward_layernorm (gate/up) and by up_proj's rows (down).
AWQ_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _awq(layer, i: int, wanted: dict, run_all, result: SequentialResult, rep: dict) -> bool:
    """Search and absorb AWQ scales where Gemma 3n allows it (see quantize.methods.awq); whether
    any of the layer's schemes asked for AWQ.

    Every float weight changed here is recorded (the norm in ``updated``, the linears' scales in
    ``rescaled``) whatever the linear's own scheme: a kept gate next to an AWQ up, or a kept up
    feeding an AWQ down, computes with its rescaled weight, so every writer must write that."""
    awq_paths = [p for p, s in wanted.items() if s.method == "awq"]
    if not awq_paths:
        return False
    for p in awq_paths:
        if p not in AWQ_LINEARS:
            rep["notes"].append(f"{p}: AWQ needs an op that can absorb 1/s; none exists for attention inputs in Gemma 3n, rounded to nearest")
    mlp = layer.mlp
    want_in = [p for p in ("mlp.gate_proj", "mlp.up_proj") if p in awq_paths]
    want_out = "mlp.down_proj" in awq_paths
    if not want_in and not want_out:
        return True
    stats = _collect(layer, run_all, ["mlp.gate_proj", "mlp.down_proj"], hessian=False)
    cols: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}
    if want_in:
        acts = stats["mlp.gate_proj"][0]
        scheme = wanted[want_in[0]]
        # the search weighs the rounding error of the linears that will be rounded (a kept one has none)
        rounded = [layer.get_submodule(p).weight.data for p in ("mlp.gate_proj", "mlp.up_proj") if p in wanted]
        s = awq_search(rounded, acts.mean_abs, scheme, acts.mean_sq).to(mlp.gate_proj.weight.device)
        norm = layer.pre_feedforward_layernorm
        new_norm, (g, u) = absorb_into_norm(norm.weight.data, [mlp.gate_proj.weight.data, mlp.up_proj.weight.data], s)
        norm.weight.data.copy_(new_norm)
        mlp.gate_proj.weight.data.copy_(g)
        mlp.up_proj.weight.data.copy_(u)
        result.updated[f"{PREFIX}.{i}.pre_feedforward_layernorm.weight"] = new_norm.detach().cpu().clone()
        cols["mlp.gate_proj"] = cols["mlp.up_proj"] = s.detach().cpu().clone()
    if want_out:
        acts = stats["mlp.down_proj"][0]
        s = awq_search([mlp.down_proj.weight.data], acts.mean_abs, wanted["mlp.down_proj"], acts.mean_sq).to(mlp.down_proj.weight.device)
        u, d = absorb_into_linear(mlp.up_proj.weight.data, mlp.down_proj.weight.data, s)
        mlp.up_proj.weight.data.copy_(u)
        mlp.down_proj.weight.data.copy_(d)
        cols["mlp.down_proj"] = rows["mlp.up_proj"] = s.detach().cpu().clone()
    # Columns first, then rows: the order the weights were changed in above (bit for bit).
    for p in AWQ_LINEARS:
        if p in cols or p in rows:
            result.rescaled[text_linear_name(i, p)] = Rescale(cols.get(p), rows.get(p))
    return True
