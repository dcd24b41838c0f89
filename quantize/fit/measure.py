"""Measure how much each text tensor group costs in KL at each GGUF type, cheaply.

The model (after ExLlamaV3's ``doc/optimize.md``): quantizing group g to type t adds

    KL_g(t) ~= s_g * e_g(t),    e_g(t) = ||W - deq(quant_t(W))||^2 / ||W||^2

where e_g(t) is the relative squared weight error of t on g's own weights (ggml's quantizer,
as llama.cpp's ``llama-quantize`` runs it without an imatrix; gguf's own dequantizer) and s_g is
measured once per group: one real probe in transformers with only g fake-quantized at the probe
type, KL against the unquantized model on the recipe's calibration text, s_g = KL / e_g(probe).
A group is one GGUF tensor (per layer: attn_q/k/v/output, ffn_gate/up/down, inp_gate, proj;
token_embd, which is also the tied output layer; the per-layer table per_layer_token_embd).
KV sharing: a producer's attn_k / attn_v feed its consumers too, and the probe runs the whole
model, so s_g covers them; consumers' own k/v are dead placeholders and are no group.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_VALUES = 1 << 21  # weights read per tensor for its error: the mean is what matters, not every row
SAMPLE_CHUNKS = 8  # ... as this many evenly spaced runs of rows, so a 5 GB table is never read whole


def candidate_types() -> list[str]:
    """The GGUF types the writer supports that a group may get (F32/BF16 add nothing over F16)."""
    from quantize.recipe import GGUF_TYPES

    return [t for t in GGUF_TYPES if t not in ("F32", "BF16")]


def probe_types() -> list[str]:
    return [t for t in candidate_types() if t != "F16"]


@dataclass
class Group:
    name: str  # the GGUF tensor name
    sources: tuple[str, ...]  # checkpoint tensor names
    rows: int
    cols: int
    weights: int
    types: list[str]  # candidates, cheapest first
    bytes: dict[str, int]
    pinned: str | None = None  # a recipe rule fixes the type
    error: dict[str, float] = field(default_factory=dict)
    probe_kl: float | None = None
    sensitivity: float = 0.0

    def predicted(self, t: str) -> float:
        return self.sensitivity * self.error[t]


def relative_error(w: np.ndarray, qtype: str) -> float:
    """||W - deq(quant(W))||^2 / ||W||^2 of a (rows, cols) float matrix."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    from quantize.formats.gguf.ggml_quants import quantize_rows

    w = np.asarray(w, np.float32).reshape(-1, w.shape[-1])
    if qtype == "F16":
        d = w.astype(np.float16).astype(np.float32)
    else:
        d = dequantize(quantize_rows(w, T[qtype]), T[qtype]).reshape(w.shape)
    norm = float(np.square(w, dtype=np.float64).sum())
    return float(np.square(w - d, dtype=np.float64).sum() / norm) if norm > 0 else 0.0


def fake_quantized(w, qtype: str):
    """A torch weight as llama.cpp will see it after ``qtype`` (same shape and dtype)."""
    import torch
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    from quantize.formats.gguf.ggml_quants import quantize_rows

    x = w.detach().to(torch.float32).reshape(-1, w.shape[-1]).numpy()
    d = x.astype(np.float16).astype(np.float32) if qtype == "F16" else dequantize(quantize_rows(x, T[qtype]), T[qtype])
    return torch.from_numpy(np.ascontiguousarray(d).reshape(w.shape)).to(w.dtype)


def sample_rows(ckpt, name: str, cols: int) -> np.ndarray:
    """The tensor as (rows, cols) float32, or about SAMPLE_VALUES of it in SAMPLE_CHUNKS runs of rows."""
    import torch

    info = ckpt.tensors[name]
    rows = info.numel // cols
    if info.numel <= SAMPLE_VALUES or len(info.shape) != 2 or info.shape[1] != cols:
        return ckpt.get(name).to(torch.float32).reshape(-1, cols).numpy()
    run = max(1, SAMPLE_VALUES // cols // SAMPLE_CHUNKS)
    starts = np.linspace(0, rows - run, SAMPLE_CHUNKS).astype(np.int64)
    return np.concatenate([ckpt.read_rows(name, int(s), int(s) + run).to(torch.float32).numpy() for s in starts])


def measure_errors(groups: list[Group], ckpt) -> None:
    for g in groups:
        ws = [sample_rows(ckpt, s, g.cols) for s in g.sources]
        for t in g.types:
            # a stacked tensor's error is the weighted mean over its parts
            errs = [(relative_error(w, t), float(np.square(w, dtype=np.float64).sum())) for w in ws]
            total = sum(n for _, n in errs)
            g.error[t] = sum(e * n for e, n in errs) / total if total else 0.0


def prober_bytes(ckpt, positions: int) -> int:
    """Memory the ``Prober`` needs: the whole model in fp32 (what ``from_pretrained`` keeps: every
    checkpoint tensor but the dead k/v) and, per probe position, the base log-probabilities, one
    probe's and its logits over the full vocabulary (float64, float64 and float32)."""
    dead = set(ckpt.dead_kv())
    weights = sum(4 * t.numel for n, t in ckpt.tensors.items() if n not in dead)
    return weights + positions * int(ckpt.text_config["vocab_size"]) * (8 + 8 + 4)


def available_bytes() -> int | None:
    """RAM plus swap the kernel says a new allocation can get (Linux ``/proc/meminfo``); None elsewhere."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
        return sum(int(fields[k].split()[0]) * 1024 for k in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError):
        return None


def check_prober_memory(ckpt, positions: int, available: int | None = None) -> None:
    """One line, before minutes of loading, where the probes cannot fit: the process would be
    killed by the kernel instead (E4B needs about 40 GB: 31 GB of fp32 weights, 8 GB of log-probabilities
    at 8 x 512 positions). ``available``: bytes (default: this machine's ``available_bytes``)."""
    from quantize.errors import QuantizeError

    need = prober_bytes(ckpt, positions)
    have = available_bytes() if available is None else available
    if have is not None and need > have:
        gib = 2**30
        raise QuantizeError(
            f"fit: probing {ckpt.folder} needs about {need / gib:.1f} GiB (the whole model in fp32 plus log-probabilities "
            f"of {positions} positions over {int(ckpt.text_config['vocab_size'])} tokens); {have / gib:.1f} GiB of memory "
            "is available. Valid: a machine with that much memory, fewer probe positions (fit.samples, "
            "calibration.text.seq_len), or an explicit allocation (exports.gguf.tensor_types) without fit")


class Prober:
    """The unquantized model's log-probabilities on the probe text, and KL of a model with some
    tensors fake-quantized against them (mean over positions, full vocabulary)."""

    def __init__(self, folder, texts):
        import torch
        from transformers import Gemma3nForConditionalGeneration

        self.model = Gemma3nForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.params = dict(self.model.named_parameters())
        # samples of one length run as one batch: a probe costs a forward per length, not per sample
        by_len: dict[int, list] = {}
        for ids in texts:
            by_len.setdefault(ids.shape[-1], []).append(ids.reshape(1, -1))
        self.texts = [torch.cat(v) for _, v in sorted(by_len.items())]
        self.base = [self._logp(ids) for ids in self.texts]

    def _logp(self, ids):
        import torch

        with torch.inference_mode():
            # float64: one group's KL is ~1e-9 on small models, below float32's rounding of the sum
            return torch.log_softmax(self.model(input_ids=ids).logits.double(), dim=-1).flatten(0, 1)

    def kl(self, swaps: dict[str, str]) -> float:
        """Mean KL(base || model with each checkpoint tensor in ``swaps`` fake-quantized to its type)."""
        saved = {}
        try:
            for name, t in swaps.items():
                p = self.params[name]
                saved[name] = p.data
                p.data = fake_quantized(p.data, t)
            total, n = 0.0, 0
            for ids, base in zip(self.texts, self.base):
                logq = self._logp(ids)
                total += float((base.exp() * (base - logq)).sum(-1).sum())
                n += base.shape[0]
            return total / max(n, 1)
        finally:
            for name, data in saved.items():
                self.params[name].data = data

    def missing(self, names) -> list[str]:
        return [n for n in names if n not in self.params]


def measure_sensitivity(groups: list[Group], prober: Prober, probe: str) -> None:
    """One probe per unpinned group at ``probe`` (or the group's cheapest candidate when the probe
    type does not fit its rows): s_g = KL / e_g."""
    for i, g in enumerate(groups):
        if g.pinned is not None:
            continue
        t = probe if probe in g.types else g.types[0]
        g.probe_kl = prober.kl({s: t for s in g.sources})
        g.sensitivity = g.probe_kl / g.error[t] if g.error[t] > 0 else 0.0
        log.debug("probe %d/%d %s at %s: KL %.3e, error %.3e", i + 1, len(groups), g.name, t, g.probe_kl, g.error[t])
