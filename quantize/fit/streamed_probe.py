"""``fit``'s probes, streamed through the checkpoint one decoder layer at a time.

Why not the whole model once per group (``measure.Prober``, kept as the reference the tests and
bench check this against): it holds the model in fp32 (31 GB for E4B) and runs the full forward
once per group, about 320 forwards for E4B. Here ``quantize.streamed_model.StreamedModel`` reads
a decoder layer from the checkpoint, runs it, releases it, and two kinds of probe share passes:

- ``run_probes``, true KL: one pass over the layers carries the unquantized model's hidden state
  (the *base*) and every *stream*: the model with a set of tensors fake-quantized, started where
  its first swapped tensor acts (its decoder layer; the embedding for the token tables) from the
  base's state there, with its own KV-sharing dict. Each layer is read once whatever the number
  of streams. After the last layer each stream's mean KL against the base is computed over the
  full vocabulary, positions in chunks (no full log-probability table is kept).
- ``gradient_probes``, a second-order (Fisher) estimate of the KL of tensors inside one decoder
  layer: a forward pass keeps every layer's input; labels drawn from the base model's output give
  output gradients, carried down layer by layer (each layer recomputed from its input, the K/V
  gradients of KV-sharing consumers carried to their store layer); at each layer every probe
  runs the layer alone with its tensors fake-quantized and its change is scored against them.
  Per layer that is one forward with autograd, a backward per label draw and a layer forward per
  probe, instead of the rest of the model per probe.

A token table's fake-quantized rows equal the rows of the fake-quantized table (GGUF blocks run
along a row), so the streamed model's row subsets are swapped exactly.
"""
from __future__ import annotations

import dataclasses
import logging
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
    """``stream_kl[k]``: mean KL (full vocabulary, per position) of stream k against the base."""

    stream_kl: list[float]
    positions: int


def start_of(name: str) -> int:
    """Where a checkpoint tensor acts first: its decoder layer, or ``EMBEDDING`` for the token tables."""
    if name in (TOKEN_TABLE, PER_LAYER_TABLE):
        return EMBEDDING
    m = _LAYER.match(name)
    if not m:
        raise ValueError(f"{name!r}: the streamed probes swap decoder-layer tensors and the two token tables only")
    return int(m.group(1))


def batches_by_length(texts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Samples of one length as one batch (sorted by length): a probe costs a forward per length, not per sample."""
    by_len: dict[int, list] = {}
    for ids in texts:
        by_len.setdefault(ids.shape[-1], []).append(ids.reshape(1, -1))
    return [torch.cat(v) for _, v in sorted(by_len.items())]


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


def output_layer(ckpt) -> tuple[str, torch.Tensor]:
    """The LM head's checkpoint name and its weight in fp32 (Gemma 3n ties it to the token table)."""
    name = "lm_head.weight" if "lm_head.weight" in ckpt.tensors else TOKEN_TABLE
    return name, ckpt.get(name).to(torch.float32)


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
               progress: bool = True) -> ProbeResult:
    """True KL of each stream (checkpoint name -> GGUF type, fake-quantized together) on
    ``texts`` ((1, T) token ids), in fp32."""
    from tqdm.auto import tqdm

    from quantize.sequential import capture_layer_inputs, run_layer
    from quantize.streamed_model import StreamedModel

    starts = []
    for k, s in enumerate(streams):
        if not s:
            raise ValueError(f"stream {k} swaps nothing")
        starts.append(min(start_of(n) for n in s))
    batches = batches_by_length(texts)
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
    bar = tqdm(range(len(lm.layers)), desc="fit: probing layers", unit="layer", disable=not progress)
    for j in bar:
        sm.load_layer(j)
        layer, lt = lm.layers[j], types[j]
        swapper = _Swapper(layer, j)
        for k, s in enumerate(streams):
            if starts[k] == j:
                active.append(_Stream(k, list(base_h), [_own_kv(c) for c in base_ctx]))
        base_out = [run_layer(layer, j, lt, h, c) for h, c in zip(base_h, base_ctx)]
        for st in active:
            here = {n: t for n, t in streams[st.k].items() if start_of(n) == j}
            with swapper.swapped(here):
                st.hidden = [run_layer(layer, j, lt, h, c) for h, c in zip(st.hidden, st.contexts)]
        base_h = base_out
        swapper = None
        sm.release_layer(j)

    sm.load_final()
    kl, positions = _stream_kl(ckpt, lm, base_h, active, streams)
    return ProbeResult(kl, positions)


LABEL_SAMPLES = 8  # label draws per position for the Fisher estimate (relative noise about sqrt(2 / (8 x sequences)))


@torch.no_grad()
def gradient_probes(ckpt, texts: Sequence[torch.Tensor], probes: Sequence[Mapping[str, str]], samples: int = LABEL_SAMPLES,
                    seed: int = 0, labels: Sequence[torch.Tensor] | None = None, progress: bool = True) -> list[float]:
    """Estimated mean KL (per position) of each probe: checkpoint name -> GGUF type for tensors
    of one decoder layer, fake-quantized together.

    To second order, KL(p || q) of a small change of the model is 1/2 u^T F u, F the Fisher
    information of the output distribution (the Gauss-Newton matrix at the base model), and
    F = E_{y ~ p}[grad log q(y) grad log q(y)^T] (Martens, "New insights and perspectives on
    the natural gradient method", JMLR 2020, sections 9.2-9.3). So, with ``samples`` labels drawn
    from the base model at every position,

        KL ~= 1/2 sum_r mean_m s_{m,r}^2,   s_{m,r} = sum_t grad_{h_j} log q(y^m_{r,t}) . delta_r

    where delta_r is the change of layer j's output for sequence r when the probe's tensors are
    fake-quantized, run on the base's input to the layer (the change itself: only the layers
    after j are linearised), plus, for a KV store layer, the change of the K/V it leaves for its
    consumers dotted with their gradients. Sequences are independent: their scores are squared
    separately, which cuts the variance. ``labels``: per batch (samples, B, T) token ids to use
    instead of drawing them (tests). Cost: the base forward, then per layer one forward with
    autograd and ``samples`` backward passes, and one layer forward per probe.
    """
    from tqdm.auto import tqdm

    from quantize.sequential import capture_layer_inputs, run_layer
    from quantize.streamed_model import StreamedModel

    at: dict[int, list[int]] = {}
    for q, s in enumerate(probes):
        layers = {start_of(n) for n in s}
        if len(layers) != 1 or EMBEDDING in layers:
            raise ValueError(f"probe {q} must swap tensors of one decoder layer, got {sorted(s)}")
        at.setdefault(layers.pop(), []).append(q)
    batches = batches_by_length(texts)
    sm = StreamedModel(ckpt, batches, dtype=torch.float32)
    lm = sm.model.model.language_model
    types, modes = lm.config.layer_types, lm.config.kv_sharing_modes
    n = len(lm.layers)
    h, base_ctx = capture_layer_inputs(sm.model, [{"input_ids": ids} for ids in batches], "cpu", torch.float32, streamed=sm)
    bar = tqdm(total=2 * n, desc="fit: probing (forward, then gradients)", unit="layer", disable=not progress)
    stored = []  # every layer's input: the backward pass recomputes each layer from it
    for j in range(n):
        sm.load_layer(j)
        stored.append(h)
        h = [run_layer(lm.layers[j], j, types[j], x, c) for x, c in zip(h, base_ctx)]
        sm.release_layer(j)
        bar.update()
    sm.load_final()
    _, head = output_layer(ckpt)
    gen = torch.Generator().manual_seed(seed)
    grads = [_output_scores(lm, head, x, samples, gen, None if labels is None else labels[b]) for b, x in enumerate(h)]
    del head
    est = [0.0] * len(probes)
    kv_grads: dict[str, list] = {}  # attention type -> per batch (dK, dV), each (samples, *K.shape): consumers' sum
    for j in reversed(range(n)):
        sm.load_layer(j)
        layer, lt, mode = lm.layers[j], types[j], modes[j]
        swapper = _Swapper(layer, j)
        for b in range(len(batches)):
            x = stored[j][b].detach().requires_grad_(True)
            ctx = _own_kv(base_ctx[b])
            wrt = [x]
            if mode == "reuse":  # the producer's K/V as leaves: their gradients go back to it
                kv = tuple(t.detach().requires_grad_(True) for t in ctx.shared_kv[lt])
                ctx.shared_kv[lt] = kv
                wrt += list(kv)
            with torch.enable_grad():
                out = run_layer(layer, j, lt, x, ctx)
            outs = [out]
            downstream = kv_grads.get(lt, [None] * len(batches))[b] if mode == "store" else None
            if downstream is not None:
                outs += list(ctx.shared_kv[lt])
            new = torch.empty((samples, *x.shape), dtype=x.dtype)
            for m in range(samples):
                g_out = [grads[b][m]] + ([downstream[0][m], downstream[1][m]] if downstream is not None else [])
                res = torch.autograd.grad(outs, wrt, g_out, retain_graph=m < samples - 1)
                new[m] = res[0]
                if mode == "reuse":
                    acc = kv_grads.setdefault(lt, [None] * len(batches))
                    if acc[b] is None:
                        acc[b] = tuple(torch.zeros((samples, *t.shape), dtype=t.dtype) for t in res[1:])
                    acc[b][0][m] += res[1]
                    acc[b][1][m] += res[2]
            base_out = out.detach()
            base_kv = tuple(t.detach() for t in ctx.shared_kv[lt]) if downstream is not None else None
            del out, outs, ctx
            for q in at.get(j, ()):
                with swapper.swapped(probes[q]):
                    c2 = _own_kv(base_ctx[b])
                    d = run_layer(layer, j, lt, stored[j][b], c2) - base_out  # (altup, B, T, hidden)
                    score = (grads[b] * d).sum(dim=(1, 3, 4)).double()  # (samples, B)
                    if base_kv is not None:
                        for g_kv, new_kv, old in zip(downstream, c2.shared_kv[lt], base_kv):
                            score += (g_kv * (new_kv - old)).sum(dim=tuple(range(2, g_kv.dim()))).double()
                est[q] += 0.5 * float((score ** 2).sum(dim=1).mean())
            grads[b] = new
        if mode == "store":
            kv_grads.pop(lt, None)
        swapper = None
        sm.release_layer(j)
        bar.update()
    bar.close()
    positions = sum(int(t.numel()) for t in batches)
    return [e / positions for e in est]


def _output_scores(lm, head: torch.Tensor, h: torch.Tensor, samples: int, gen, labels) -> torch.Tensor:
    """(samples, *h.shape): the gradient of sum_t log q(y_t) with respect to the last layer's
    output h, for labels y drawn from the base model's distribution (or given, (samples, B, T)).
    Through the head by hand (d log q(y) / d logits = onehot(y) - p, times the soft cap's
    derivative 1 - tanh^2), through the final norm and AltUp unembedding by autograd."""
    cap = lm.config.final_logit_softcapping
    x = h.detach().requires_grad_(True)
    with torch.enable_grad():
        fh = final_hidden(lm, x)  # (B, T, hidden)
    flat = fh.detach().reshape(-1, fh.shape[-1])
    g_fh = torch.empty((samples, *flat.shape), dtype=flat.dtype)
    for s in range(0, flat.shape[0], POSITIONS_PER_CHUNK):
        z = flat[s:s + POSITIONS_PER_CHUNK] @ head.T
        t = torch.tanh(z / cap) if cap is not None else None
        logits = t * cap if cap is not None else z
        p = torch.softmax(logits.double(), dim=-1)
        if labels is None:
            y = torch.multinomial(p, samples, replacement=True, generator=gen).T  # (samples, chunk)
        else:
            y = labels.reshape(samples, -1)[:, s:s + POSITIONS_PER_CHUNK]
        for m in range(samples):
            g = -p
            g[torch.arange(len(y[m])), y[m]] += 1.0
            if t is not None:
                g = g * (1.0 - t.double() ** 2)
            g_fh[m, s:s + POSITIONS_PER_CHUNK] = (g.to(head.dtype) @ head)
    out = torch.empty((samples, *h.shape), dtype=h.dtype)
    for m in range(samples):
        out[m] = torch.autograd.grad(fh, x, g_fh[m].reshape(fh.shape), retain_graph=m < samples - 1)[0]
    return out


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
    head_name, head = output_layer(ckpt)
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
