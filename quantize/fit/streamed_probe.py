"""``fit``'s probes, streamed through the checkpoint one decoder layer at a time.

Why not the whole model once per group (``measure.Prober``, kept as the reference the tests and
bench check this against): it holds the model in fp32 (31 GB for E4B) and runs the full forward
once per group, about 320 forwards for E4B. Here:

- **One pass over the layers.** ``quantize.streamed_model.StreamedModel`` reads a decoder layer
  from the checkpoint, runs it, releases it. The pass carries the unquantized model's hidden
  state (the *base*) and every *stream*: the model with a set of tensors fake-quantized, started
  where its first swapped tensor acts (its decoder layer; the embedding for the token tables)
  from the base's state there, with its own KV-sharing dict. Each layer is read once whatever
  the number of streams. After the last layer each stream's mean KL against the base is computed
  over the full vocabulary, positions in chunks (no full log-probability table is kept).
- **Local probes.** A set of tensors inside one decoder layer can also be measured by the change
  it makes to that layer's output alone (the 4 AltUp streams, squared and summed over positions:
  d), run on the base's input to the layer. ``measure_sensitivity`` uses one stream per layer
  (every probed group of the layer fake-quantized: its true KL and its own d) and one local probe
  per group, and estimates a group's KL as KL_layer * d_group / d_layer: per layer that costs a
  layer forward per group plus one stream to the end, instead of a full forward per group.
  Groups whose effect leaves the layer by another road get a stream of their own (true KL): the
  token table (embedding and the tied output layer), the per-layer table (every layer's
  per-layer input) and the k/v of KV store layers (their cache feeds the KV-sharing consumers).

A token table's fake-quantized rows equal the rows of the fake-quantized table (GGUF blocks run
along a row), so the streamed model's row subsets are swapped exactly.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

TEXT = "model.language_model"
TOKEN_TABLE = f"{TEXT}.embed_tokens.weight"
PER_LAYER_TABLE = f"{TEXT}.embed_tokens_per_layer.weight"
EMBEDDING = -1  # the start of a stream that swaps a token table
_LAYER = re.compile(rf"^{re.escape(TEXT)}\.layers\.(\d+)\.(.+)$")
POSITIONS_PER_CHUNK = 64  # of the output layer: 64 x vocabulary float64 log-probabilities at a time
TABLE_ROWS_PER_CHUNK = 8192  # rows fake-quantized at a time (the E4B token table is 262144 x 2048)


@dataclasses.dataclass
class ProbeResult:
    """``stream_kl[k]``: mean KL (full vocabulary, per position) of stream k against the base;
    ``stream_change[k]``: d at the output of the layer stream k starts in (nan for streams that
    start at the embedding); ``local_change[q]``: d of local probe q."""

    stream_kl: list[float]
    stream_change: list[float]
    local_change: list[float]
    positions: int


def start_of(name: str) -> int:
    """Where a checkpoint tensor acts first: its decoder layer, or ``EMBEDDING`` for the token tables."""
    if name in (TOKEN_TABLE, PER_LAYER_TABLE):
        return EMBEDDING
    m = _LAYER.match(name)
    if not m:
        raise ValueError(f"{name!r}: the streamed probes swap decoder-layer tensors and the two token tables only")
    return int(m.group(1))


def _batches(texts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Samples of one length as one batch, as ``measure.Prober`` runs them."""
    by_len: dict[int, list] = {}
    for ids in texts:
        by_len.setdefault(ids.shape[-1], []).append(ids.reshape(1, -1))
    return [torch.cat(v) for _, v in sorted(by_len.items())]


def _sq(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sum((a.double() - b.double()) ** 2))


def _own_kv(ctx):
    """The batch context with a copy of its KV-sharing dict: a run then leaves the original as it was."""
    from transformers.cache_utils import KVSharingDict

    return dataclasses.replace(ctx, shared_kv=KVSharingDict(ctx.shared_kv))


def final_hidden(lm, h: torch.Tensor) -> torch.Tensor:
    """What ``Gemma3nTextModel.forward`` (transformers 5) computes after its last decoder layer:
    the AltUp streams unembedded to the first one's magnitude, averaged, normed. The streamed
    model never runs that forward whole; tests check this against it."""
    target = torch.mean(h[0] ** 2, dim=-1, keepdim=True) ** 0.5
    parts = [h[0]]
    for i in range(1, lm.config.altup_num_inputs):
        x = lm.altup_unembed_projections[i - 1](h[i]).to(h[0].dtype)
        magnitude = torch.sqrt(torch.mean(x ** 2, dim=-1, keepdim=True).clamp(min=1e-5))
        parts.append(x * target / magnitude)
    return lm.norm(torch.stack(parts).mean(dim=0))


def _logp(hidden: torch.Tensor, head: torch.Tensor, cap: float | None) -> torch.Tensor:
    logits = hidden @ head.T
    if cap is not None:  # Gemma3nForConditionalGeneration.forward's soft cap
        logits = torch.tanh(logits / cap) * cap
    # float64: a group's KL is ~1e-9 on small models, below float32's rounding of the sum
    return torch.log_softmax(logits.double(), dim=-1)


def _fake_quantized_table(w: torch.Tensor, qtype: str) -> torch.Tensor:
    from quantize.fit.measure import fake_quantized

    out = torch.empty_like(w)
    for s in range(0, w.shape[0], TABLE_ROWS_PER_CHUNK):
        out[s:s + TABLE_ROWS_PER_CHUNK] = fake_quantized(w[s:s + TABLE_ROWS_PER_CHUNK], qtype)
    return out


@dataclasses.dataclass
class _Stream:
    k: int
    hidden: list
    contexts: list


class _Swapper:
    """Fake-quantized weights of the loaded layer, each computed once, swapped in and out."""

    def __init__(self, layer, index: int):
        self.layer, self.prefix, self.cache = layer, f"{TEXT}.layers.{index}.", {}

    @contextmanager
    def swapped(self, swaps: Mapping[str, str]):
        from quantize.fit.measure import fake_quantized

        saved = []
        try:
            for name, t in swaps.items():
                p = self.layer.get_parameter(name[len(self.prefix):])
                if (name, t) not in self.cache:
                    self.cache[(name, t)] = fake_quantized(p.data, t)
                saved.append((p, p.data))
                p.data = self.cache[(name, t)]
            yield
        finally:
            for p, data in saved:
                p.data = data


@torch.no_grad()
def run_probes(ckpt, texts: Sequence[torch.Tensor], streams: Sequence[Mapping[str, str]],
               local: Sequence[Mapping[str, str]] = (), progress: bool = True) -> ProbeResult:
    """KL of each stream (checkpoint name -> GGUF type, fake-quantized together) and d of each
    local probe (names all in one decoder layer), on ``texts`` ((1, T) token ids), in fp32."""
    from tqdm.auto import tqdm

    from quantize.sequential import capture_layer_inputs, run_layer
    from quantize.streamed_model import StreamedModel

    starts = []
    for k, s in enumerate(streams):
        if not s:
            raise ValueError(f"stream {k} swaps nothing")
        starts.append(min(start_of(n) for n in s))
    local_at: dict[int, list[int]] = {}
    for q, s in enumerate(local):
        layers = {start_of(n) for n in s}
        if len(layers) != 1 or EMBEDDING in layers:
            raise ValueError(f"local probe {q} must swap tensors of one decoder layer, got {sorted(s)}")
        local_at.setdefault(layers.pop(), []).append(q)

    batches = _batches(texts)
    sm = StreamedModel(ckpt, batches, dtype=torch.float32)
    lm = sm.model.model.language_model
    types = lm.config.layer_types
    inputs = [{"input_ids": ids} for ids in batches]
    base_h, base_ctx = capture_layer_inputs(sm.model, inputs, "cpu", torch.float32, streamed=sm)
    active: list[_Stream] = []
    for k, s in enumerate(streams):
        if starts[k] == EMBEDDING:
            with _swapped_rows(lm, s):
                h, ctx = capture_layer_inputs(sm.model, inputs, "cpu", torch.float32, streamed=sm)
            active.append(_Stream(k, h, ctx))
    stream_change = [math.nan] * len(streams)
    local_change = [0.0] * len(local)

    bar = tqdm(range(len(lm.layers)), desc="fit: probing layers", unit="layer", disable=not progress)
    for j in bar:
        sm.load_layer(j)
        layer, lt = lm.layers[j], types[j]
        swapper = _Swapper(layer, j)
        for k, s in enumerate(streams):
            if starts[k] == j:
                active.append(_Stream(k, list(base_h), [_own_kv(c) for c in base_ctx]))
        base_out = [run_layer(layer, j, lt, h, c) for h, c in zip(base_h, base_ctx)]
        for q in local_at.get(j, ()):
            with swapper.swapped(local[q]):
                local_change[q] = sum(_sq(run_layer(layer, j, lt, h, _own_kv(c)), o)
                                      for h, c, o in zip(base_h, base_ctx, base_out))
        for st in active:
            here = {n: t for n, t in streams[st.k].items() if start_of(n) == j}
            with swapper.swapped(here):
                st.hidden = [run_layer(layer, j, lt, h, c) for h, c in zip(st.hidden, st.contexts)]
            if starts[st.k] == j:
                stream_change[st.k] = sum(_sq(a, b) for a, b in zip(st.hidden, base_out))
        base_h = base_out
        swapper = None
        sm.release_layer(j)

    sm.load_final()
    kl, positions = _stream_kl(ckpt, lm, base_h, active, streams)
    return ProbeResult(kl, stream_change, local_change, positions)


@contextmanager
def _swapped_rows(lm, swaps: Mapping[str, str]):
    """The streamed model's token-table rows fake-quantized (``RowTable.weight``) for a capture."""
    from quantize.fit.measure import fake_quantized

    saved = []
    try:
        for name, module in ((TOKEN_TABLE, lm.embed_tokens), (PER_LAYER_TABLE, lm.embed_tokens_per_layer)):
            if name in swaps:
                saved.append((module, module.weight))
                module.weight = fake_quantized(module.weight, swaps[name])
        yield
    finally:
        for module, w in saved:
            module.weight = w


def _stream_kl(ckpt, lm, base_h, active: list[_Stream], streams) -> tuple[list[float], int]:
    """Each stream's mean KL against the base over every position and the full vocabulary."""
    head_name = "lm_head.weight" if "lm_head.weight" in ckpt.tensors else TOKEN_TABLE  # Gemma 3n ties them
    head = ckpt.get(head_name).to(torch.float32)
    heads = {}
    for st in active:
        t = streams[st.k].get(head_name)
        if t is not None and t not in heads:
            heads[t] = _fake_quantized_table(head, t)
    cap = lm.config.final_logit_softcapping
    total = [0.0] * len(streams)
    positions = 0
    finals = {st.k: [final_hidden(lm, h) for h in st.hidden] for st in active}
    for b, h in enumerate(base_h):
        base = final_hidden(lm, h).reshape(-1, h.shape[-1])
        for s in range(0, base.shape[0], POSITIONS_PER_CHUNK):
            p = _logp(base[s:s + POSITIONS_PER_CHUNK], head, cap)
            for st in active:
                t = streams[st.k].get(head_name)
                x = finals[st.k][b].reshape(-1, h.shape[-1])[s:s + POSITIONS_PER_CHUNK]
                q = _logp(x, heads[t] if t is not None else head, cap)
                total[st.k] += float((p.exp() * (p - q)).sum())
        positions += base.shape[0]
    return [v / max(positions, 1) for v in total], positions


def probe_bytes(ckpt, positions: int, n_streams: int) -> int:
    """Memory ``run_probes`` needs, an upper estimate: one decoder layer in fp32 twice (its weights
    and their fake-quantized copies), the output layer in fp32 twice (float and fake-quantized),
    the token-table rows of the probe tokens, the hidden states (4 AltUp streams) of the base and
    every stream, one chunk of log-probabilities; the rest (config-sized buffers) is small."""
    tc = ckpt.text_config
    hidden, vocab = int(tc["hidden_size"]), int(tc["vocab_size"])
    layer = sum(t.numel for n, t in ckpt.tensors.items() if n.startswith(f"{TEXT}.layers.0."))
    per_layer = int(tc["num_hidden_layers"]) * int(tc["hidden_size_per_layer_input"])
    altup = int(tc.get("altup_num_inputs", 4))
    return (2 * 4 * layer + 2 * 4 * vocab * hidden + positions * 4 * (hidden + per_layer)
            + (n_streams + 2) * positions * 4 * altup * hidden + 4 * POSITIONS_PER_CHUNK * vocab * 8)
