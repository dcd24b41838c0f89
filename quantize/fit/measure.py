"""Measure how much each text tensor group costs in KL at each GGUF type, cheaply.

The model (after ExLlamaV3's ``doc/optimize.md``): quantizing group g to type t adds

    KL_g(t) ~= s_g * e_g(t),    e_g(t) = ||W - deq(quant_t(W))||^2 / ||W||^2

where e_g(t) is the relative squared weight error of t on g's own weights (ggml's quantizer,
as llama.cpp's ``llama-quantize`` runs it without an imatrix; gguf's own dequantizer) and s_g is
measured once per group: the KL against the unquantized model, on the recipe's calibration text,
of the model with only g fake-quantized at the probe type, s_g = KL / e_g(probe). The probes
stream the checkpoint (``streamed_probe``: a group inside a decoder layer gets a Fisher estimate
of its KL from sampled output gradients; the token tables their true KL);
``Prober`` (the whole model in transformers, one full forward per swap) is the reference they
are checked against in the tests and the bench.
A group is one GGUF tensor (per layer: attn_q/k/v/output, ffn_gate/up/down, inp_gate, proj;
token_embd, which is also the tied output layer; the per-layer table per_layer_token_embd).
KV sharing: a producer's attn_k / attn_v feed its consumers too, and their probe runs the model
from the producer to the end, so s_g covers them; consumers' own k/v are dead placeholders and
are no group.
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


def prober_bytes(ckpt, positions: int, n_groups: int | None = None, probes: str = "gradient") -> int:
    """Memory the probes need (``streamed_probe.probe_bytes``) for ``n_groups`` probed groups
    (default: every group a Gemma 3n text GGUF has: 9 per layer, the two tables)."""
    from quantize.fit.streamed_probe import probe_bytes

    n = int(ckpt.text_config["num_hidden_layers"])
    return probe_bytes(ckpt, positions, n_streams(ckpt.text_config, 9 * n + 2 if n_groups is None else n_groups, probes))


def n_streams(text_config: dict, n_groups: int, probes: str = "gradient") -> int:
    """Hidden states ``measure_sensitivity`` keeps per position at most: a stream per group
    (``group``); with ``gradient``, the two tables' streams or, in the gradient pass, every
    layer's input and the label samples' gradients (``streamed_probe.LABEL_SAMPLES``)."""
    from quantize.fit.streamed_probe import LABEL_SAMPLES

    if probes == "group":
        return n_groups
    return max(2, int(text_config["num_hidden_layers"]) + 2 * LABEL_SAMPLES + 1)


def available_bytes() -> int | None:
    """RAM plus swap the kernel says a new allocation can get (Linux ``/proc/meminfo``); None elsewhere."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
        return sum(int(fields[k].split()[0]) * 1024 for k in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError):
        return None


def check_prober_memory(ckpt, positions: int, available: int | None = None, n_groups: int | None = None,
                        probes: str = "gradient") -> None:
    """One line, before minutes of work, where the probes cannot fit: the process would be killed
    by the kernel instead. ``available``: bytes (default: this machine's ``available_bytes``)."""
    from quantize.errors import QuantizeError

    need = prober_bytes(ckpt, positions, n_groups, probes)
    have = available_bytes() if available is None else available
    if have is not None and need > have:
        gib = 2**30
        raise QuantizeError(
            f"fit: probing {ckpt.folder} needs about {need / gib:.1f} GiB (one decoder layer and the output layer in fp32, "
            f"hidden states of {positions} positions per probe stream); {have / gib:.1f} GiB of memory "
            "is available. Valid: a machine with that much memory, fewer probe positions (fit.samples, "
            "calibration.text.seq_len), or an explicit allocation (exports.gguf.tensor_types) without fit")


class Prober:
    """The unquantized model's log-probabilities on the probe text, and KL of a model with some
    tensors fake-quantized against them (mean over positions, full vocabulary): the whole model in
    transformers, the reference ``streamed_probe`` is checked against (fit itself streams)."""

    def __init__(self, folder, texts):
        import torch
        from transformers import Gemma3nForConditionalGeneration

        from quantize.fit.streamed_probe import batches_by_length

        self.model = Gemma3nForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32, use_kernels=False).eval()
        self.params = dict(self.model.named_parameters())
        self.texts = batches_by_length(texts)
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


def probe_type(g: Group, probe: str) -> str:
    """The type g is probed at: ``probe``, or g's cheapest candidate where ``probe`` does not fit its rows."""
    return probe if probe in g.types else g.types[0]


def measure_sensitivity(groups: list[Group], ckpt, texts, probe: str, progress: bool = True, probes: str = "gradient",
                        seed: int = 0) -> None:
    """s_g = KL_g / e_g(probe) for every unpinned group, streaming the checkpoint (``streamed_probe``).

    ``probes="gradient"`` (the default: E4B in under an hour on 2 cores): a group inside a decoder
    layer gets the Fisher estimate of its KL (``streamed_probe.gradient_probes``: the change it
    makes to its layer's output, and to the K/V a store layer shares, against sampled output
    gradients; ``seed`` draws the labels); the two token tables, which act at every layer and
    (the token table) at the output, get their true KL. ``probes="group"``: every group's true
    KL (a stream from its layer to the end: several times the time; not measured on E4B)."""
    from quantize.fit.streamed_probe import EMBEDDING, gradient_probes, run_probes, start_of

    todo = [g for g in groups if g.pinned is None]
    own, inside = [], []
    for g in todo:
        starts = {start_of(s) for s in g.sources}
        (inside if probes == "gradient" and len(starts) == 1 and EMBEDDING not in starts else own).append(g)
    swaps = lambda g: {s: probe_type(g, probe) for s in g.sources}  # noqa: E731
    if own:
        for g, kl in zip(own, run_probes(ckpt, texts, [swaps(g) for g in own], progress).stream_kl):
            g.probe_kl = kl
    if inside:
        for g, kl in zip(inside, gradient_probes(ckpt, texts, [swaps(g) for g in inside], seed=seed, progress=progress)):
            g.probe_kl = kl
    for g in todo:
        e = g.error[probe_type(g, probe)]
        g.sensitivity = g.probe_kl / e if e > 0 else 0.0
        log.debug("%s at %s: KL %.3e, error %.3e", g.name, probe_type(g, probe), g.probe_kl, e)
