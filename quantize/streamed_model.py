"""A Gemma 3n model whose weights stay in the checkpoint until a calibration step needs them.

The whole-model path (``from_pretrained``) holds every weight, 16 GB of bf16 for E4B, although
the sequential engine uses one decoder layer at a time. Here the transformers model is built
as a skeleton (parameters on the meta device; buffers, which are computed from the config, such
as the rotary tables and embedding scales, are real) and only these are materialised:

- always: what the forward runs before decoder layer 0 besides the token tables (the AltUp
  projections, the per-layer model projection and its norm, the vision/audio embedders, which
  map the multimodal token ids every batch carries);
- the rows of the token-embedding and per-layer tables that the calibration tokens use (the
  262144-row tables are never read whole);
- one decoder layer between ``load_layer`` and ``release_layer``;
- a tower (vision, audio) between ``load_tower`` and ``release_tower``.

The final norm and the AltUp unembedding projections are read only by ``load_final`` (``fit``'s
probes need the output; calibration does not), the LM head (the tied token table) never. The
modules are transformers' own, so the forward computes exactly what the whole model computes.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from quantize.errors import ModelError
from quantize.model import Checkpoint

TEXT = "model.language_model"
# Modules the forward needs before decoder layer 0 (small: a few hidden x hidden matrices).
ALWAYS = (
    f"{TEXT}.altup_projections",
    f"{TEXT}.per_layer_model_projection",
    f"{TEXT}.per_layer_projection_norm",
)
# What the text model runs after its last decoder layer, before the LM head.
FINAL = (f"{TEXT}.altup_unembed_projections", f"{TEXT}.norm")
EMBEDDERS = {"vision": "model.embed_vision", "audio": "model.embed_audio"}
TOWERS = {"vision": "model.vision_tower", "audio": "model.audio_tower"}


class RowTable(nn.Module):
    """The rows of a ``Gemma3nTextScaledWordEmbedding`` that the calibration tokens use.

    Computes what the full table computes for those ids (a row copy times the embedding scale);
    any other id is refused rather than embedded wrongly."""

    def __init__(self, name: str, ids: torch.Tensor, rows: torch.Tensor, embed_scale: torch.Tensor):
        super().__init__()
        self.name = name
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("weight", rows, persistent=False)
        self.register_buffer("embed_scale", embed_scale, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        idx = torch.searchsorted(self.ids, input_ids).clamp(max=len(self.ids) - 1)
        missing = self.ids[idx] != input_ids
        if bool(missing.any()):
            bad = int(input_ids[missing][0])
            raise ModelError(f"{self.name}: token id {bad} was not among the calibration tokens the streamed model read")
        return self.weight[idx] * self.embed_scale.to(self.weight.dtype)


def _auto_dtype(ckpt: Checkpoint, config) -> torch.dtype:
    """The dtype ``from_pretrained(dtype="auto")`` gives: the config's, else the checkpoint's."""
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt)
    if isinstance(dt, torch.dtype):
        return dt
    return ckpt.get(f"{TEXT}.embed_tokens.weight").dtype


class StreamedModel:
    """``model``: the skeleton ``Gemma3nForConditionalGeneration``; ``token_ids``: every
    calibration batch's ``input_ids`` (their rows are read from the two token tables);
    ``dtype``: what every weight is materialised in (default: what ``from_pretrained(dtype="auto")``
    gives)."""

    def __init__(self, ckpt: Checkpoint, token_ids: Iterable[torch.Tensor], dtype: torch.dtype | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, Gemma3nForConditionalGeneration

        self.ckpt = ckpt
        self._tower_dtypes: dict[str, torch.dtype] = {}  # towers loaded in a dtype other than self.dtype
        self._skeleton_dtypes: dict[str, torch.dtype] = {}  # what _load materialised in another dtype
        config = AutoConfig.from_pretrained(str(ckpt.folder))
        self.dtype = dtype or _auto_dtype(ckpt, config)
        # include_buffers=False: buffers are computed from the config in __init__ (rotary
        # frequencies, embedding scales) and must be real; parameters go to meta.
        with init_empty_weights(include_buffers=False):
            self.model = Gemma3nForConditionalGeneration._from_config(config, dtype=self.dtype).eval()
        for prefix in ALWAYS:
            self._load(prefix)
        ids = torch.cat([t.reshape(-1).to(torch.long) for t in token_ids])
        self._load_embedders(ids)
        lm = self.model.model.language_model
        tc = lm.config
        lm.embed_tokens = self._rows(f"{TEXT}.embed_tokens", lm.embed_tokens, ids)
        # get_per_layer_inputs maps ids outside the per-layer table to row 0 before the lookup.
        in_table = (ids >= 0) & (ids < tc.vocab_size_per_layer_input)
        lm.embed_tokens_per_layer = self._rows(f"{TEXT}.embed_tokens_per_layer", lm.embed_tokens_per_layer,
                                               torch.where(in_table, ids, 0))

    # -- what callers use -------------------------------------------------------------------
    def load_layer(self, i: int) -> None:
        self._load(f"{TEXT}.layers.{i}")

    def release_layer(self, i: int) -> None:
        self._release(f"{TEXT}.layers.{i}")

    def load_final(self) -> None:
        for prefix in FINAL:
            self._load(prefix)

    def load_tower(self, tower: str, dtype: torch.dtype | None = None) -> None:
        """Materialise ``tower`` ("vision", "audio"), in ``dtype`` if given (its weights are read
        straight into it; its embedder, which the tower's features pass through and which is
        always loaded, is cast along until ``release_tower``)."""
        self._load(TOWERS[tower], dtype=dtype)
        if dtype is not None and dtype != self.dtype:
            self.model.get_submodule(EMBEDDERS[tower]).to(dtype)
            self._tower_dtypes[tower] = dtype

    def release_tower(self, tower: str) -> None:
        self._release(TOWERS[tower])
        if self._tower_dtypes.pop(tower, None) is not None:
            # the embedder serves every decoder batch: back to the stored dtype (an upcast of it
            # is undone exactly)
            self.model.get_submodule(EMBEDDERS[tower]).to(self.dtype)

    # -- machinery --------------------------------------------------------------------------
    def _rows(self, name: str, table: nn.Module, ids: torch.Tensor) -> RowTable:
        """Read the rows of ``ids`` (unique, sorted) in contiguous runs from the checkpoint."""
        uniq = torch.unique(ids)  # sorted
        rows_in = table.num_embeddings
        if len(uniq) and (int(uniq[0]) < 0 or int(uniq[-1]) >= rows_in):
            raise ModelError(f"{name}.weight: calibration token id {int(uniq[-1]) if int(uniq[-1]) >= rows_in else int(uniq[0])} "
                             f"is outside the table's {rows_in} rows")
        parts, start = [], 0
        vals = uniq.tolist()
        for k in range(1, len(vals) + 1):
            if k == len(vals) or vals[k] != vals[k - 1] + 1:
                parts.append(self.ckpt.read_rows(f"{name}.weight", vals[start], vals[k - 1] + 1))
                start = k
        rows = torch.cat(parts).to(self.dtype) if parts else torch.empty(0, table.embedding_dim, dtype=self.dtype)
        return RowTable(f"{name}.weight", uniq, rows, table.embed_scale)

    def _load_embedders(self, ids: torch.Tensor) -> None:
        """The vision/audio embedders run on every batch (Gemma3nModel.forward embeds dummy ids
        and keeps the result only where a token is multimodal). A text-only checkpoint (such as
        bench/synthetic_e4b.py's) lacks them: when no calibration token is of that modality,
        their output is discarded, so zeros stand in; otherwise the weights are required."""
        m = self.model.model
        ranges = {"vision": (m.embed_vision.vocab_offset, m.embed_audio.vocab_offset),
                  "audio": (m.embed_audio.vocab_offset, None)}
        for kind, prefix in EMBEDDERS.items():
            lo, hi = ranges[kind]
            used = bool(((ids >= lo) & (ids < hi) if hi is not None else ids >= lo).any())
            absent = not any(n.startswith(prefix + ".") for n in self.ckpt.tensors)
            self._load(prefix, zeros_if_absent=absent and not used)

    def _load(self, prefix: str, zeros_if_absent: bool = False, dtype: torch.dtype | None = None) -> None:
        """Materialise every parameter under ``prefix`` (and any persistent buffer the checkpoint
        stores) from the checkpoint, in the dtype the skeleton declares, or in ``dtype``: then
        the floating buffers computed from the config are cast too (``_release`` casts them back)."""
        module = self.model.get_submodule(prefix)
        names = self.ckpt.tensors
        for sub_name, sub in module.named_modules():
            base = f"{prefix}.{sub_name}" if sub_name else prefix
            for pname, p in list(sub._parameters.items()):
                if p is None or not p.is_meta:
                    continue
                key = f"{base}.{pname}"
                want = dtype or p.dtype
                if want != p.dtype:
                    self._skeleton_dtypes[key] = p.dtype
                if key not in names and zeros_if_absent:
                    sub._parameters[pname] = nn.Parameter(torch.zeros(p.shape, dtype=want), requires_grad=False)
                    continue
                if key not in names:
                    raise ModelError(f"{self.ckpt.folder}: tensor {key!r} not found; calibration needs it "
                                     f"(the checkpoint must hold every weight of {prefix})")
                t = self.ckpt.get(key)
                if tuple(t.shape) != tuple(p.shape):
                    raise ModelError(f"{self.ckpt.folder}: tensor {key!r} has shape {list(t.shape)}, the config gives {list(p.shape)}")
                sub._parameters[pname] = nn.Parameter(t.to(want), requires_grad=False)
            for bname, b in list(sub._buffers.items()):
                if b is None:
                    continue
                key = f"{base}.{bname}"
                want = b.dtype
                if dtype is not None and b.is_floating_point() and b.dtype != dtype:
                    self._skeleton_dtypes.setdefault(key, b.dtype)
                    want = dtype
                if bname not in sub._non_persistent_buffers_set and key in names:
                    sub._buffers[bname] = self.ckpt.get(key).to(want)
                elif want != b.dtype:
                    sub._buffers[bname] = b.to(want)

    def _release(self, prefix: str) -> None:
        """Parameters back to meta: their storage is freed once no one else holds it."""
        module = self.model.get_submodule(prefix)
        for sub_name, sub in module.named_modules():
            base = f"{prefix}.{sub_name}" if sub_name else prefix
            for pname, p in list(sub._parameters.items()):
                if p is not None and not p.is_meta:
                    # meta in the skeleton's dtype, whatever _load materialised it in
                    skel = self._skeleton_dtypes.pop(f"{base}.{pname}", p.dtype)
                    sub._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=skel, device="meta"),
                                                          requires_grad=False)
            # Buffers stay real (computed from the config) but go home to the CPU: a layer the
            # engine ran on a GPU must leave nothing there, or device memory grows per layer.
            for bname, b in list(sub._buffers.items()):
                if b is None:
                    continue
                if b.device.type != "cpu":
                    b = sub._buffers[bname] = b.cpu()
                old = self._skeleton_dtypes.pop(f"{base}.{bname}", None)
                if old is not None:
                    sub._buffers[bname] = b.to(old)
