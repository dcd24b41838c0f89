"""Quantization schemes: typed, frozen, strict, with named presets.

Modelled on compressed-tensors' ``QuantizationArgs`` and ``PRESET_SCHEMES``. A recipe names a
preset (``int4``) or spells out a scheme (``{type: int4, method: gptq, group_size: 128}``); an
unknown key, preset or value fails and lists what is valid.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

SchemeType = Literal["int4", "int8", "fp8", "keep"]
Method = Literal["rtn", "gptq", "awq"]
Strategy = Literal["tensor", "channel", "group"]
GROUP_SIZES = (32, 64, 128, 256)
BITS = {"int4": 4, "int8": 8, "fp8": 8}
GPTQ_FIELDS = ("act_order", "dampening", "block_size")  # read by method gptq alone


class QuantScheme(BaseModel):
    """How one tensor is quantized.

    - ``type``: ``int4`` / ``int8`` (integer codes with fp16 scales), ``fp8`` (e4m3 values with
      fp32 scales) or ``keep`` (unchanged, 16/32-bit).
    - ``strategy``: ``group`` (one scale per ``group_size`` consecutive input elements of a row),
      ``channel`` (one scale per output row; for embeddings, per token row), ``tensor`` (fp8 only).
    - ``symmetric``: integer codes in [-2^(b-1), 2^(b-1)-1] with no zero point; otherwise codes in
      [0, 2^b - 1] with an integer zero point per group.
    - ``method``: ``rtn`` (round to nearest; with ``importance`` it weights the scale search by
      activation statistics, like llama.cpp's imatrix), ``gptq`` or ``awq``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: SchemeType
    method: Method = "rtn"
    strategy: Strategy = "group"
    group_size: int | None = 32
    symmetric: bool = True
    importance: bool = False
    # GPTQ (arXiv 2210.17323, section 4): dampening as a fraction of the mean Hessian diagonal,
    # optional act-order (columns by decreasing Hessian diagonal), lazy block updates.
    dampening: float = 0.01
    act_order: bool = False
    block_size: int = 128

    @model_validator(mode="after")
    def _check(self) -> "QuantScheme":
        unread = self.unread()
        if unread:
            raise ValueError(f"this scheme does not read {'; '.join(unread)}")
        if self.type == "keep":
            return self
        if self.type == "fp8":
            if self.strategy == "group":
                raise ValueError("fp8 supports strategy 'tensor' or 'channel', not 'group'")
            if self.method != "rtn":
                raise ValueError(f"fp8 supports method 'rtn' only, not {self.method!r}")
            if not self.symmetric:
                raise ValueError("fp8 is symmetric; symmetric: false is not valid for fp8")
        else:
            if self.strategy == "tensor":
                raise ValueError(f"{self.type} supports strategy 'group' or 'channel', not 'tensor'")
        if self.strategy == "group":
            if self.group_size not in GROUP_SIZES:
                raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))} for strategy 'group', got {self.group_size!r}")
        if not 0 <= self.dampening < 1:
            raise ValueError(f"dampening must be in [0, 1), got {self.dampening}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        return self

    def unread(self) -> list[str]:
        """The fields set away from their defaults that this scheme does not read, each with why.
        They would be accepted and ignored, so the validator refuses them. A default is never
        listed: it changes nothing, and a dumped scheme (sweeps, fitted recipes) carries them all."""
        why = []
        for k, f in type(self).model_fields.items():
            v = getattr(self, k)
            if k == "type" or v is None or v == f.default:
                continue
            if self.type == "keep":
                why.append(f"{k} (type 'keep' reads no other field)")
            elif k in GPTQ_FIELDS and self.method != "gptq":
                why.append(f"{k} (read by method 'gptq' only; the method is {self.method!r})")
            elif k == "group_size" and self.strategy != "group":
                why.append(f"group_size (read by strategy 'group' only; the strategy is {self.strategy!r})")
            elif k == "importance" and (self.type == "fp8" or self.method == "awq"):
                why.append("importance (read by int4/int8 with method 'rtn' or 'gptq' only: fp8 rounds to "
                           "nearest, AWQ weighs by its own scales)")
        return why

    @property
    def bits(self) -> int | None:
        return BITS.get(self.type)

    @property
    def is_quantized(self) -> bool:
        return self.type != "keep"

    @property
    def effective_group(self) -> int | None:
        """Group length along the input axis; None means the whole row (or tensor)."""
        return self.group_size if self.strategy == "group" else None

    def label(self) -> str:
        if self.type == "keep":
            return "keep"
        g = f"g{self.group_size}" if self.strategy == "group" else self.strategy
        sym = "" if self.symmetric else "-asym"
        imp = "+imp" if self.importance else ""
        return f"{self.type}-{g}{sym}-{self.method}{imp}"

    def bytes_for(self, shape: tuple[int, ...], source_bytes_per_element: int) -> int:
        """Bytes this scheme needs for a tensor of ``shape`` (codes plus scales and zero points)."""
        n = 1
        for s in shape:
            n *= s
        if self.type == "keep":
            return n * source_bytes_per_element
        rows = shape[0]
        cols = n // rows if rows else 0
        if self.strategy == "tensor":
            n_scales = 1
        elif self.strategy == "channel":
            n_scales = rows
        else:
            n_scales = rows * -(-cols // self.group_size)
        scale_bytes = 2 if self.type in ("int4", "int8") else 4
        zp_bytes = 0 if self.symmetric else n_scales  # one byte per group (packed in some formats)
        return (n * self.bits + 7) // 8 + n_scales * scale_bytes + zp_bytes


PRESET_SCHEMES: dict[str, QuantScheme] = {
    "keep": QuantScheme(type="keep"),
    "int4": QuantScheme(type="int4", method="rtn", strategy="group", group_size=32),
    "int4_gptq": QuantScheme(type="int4", method="gptq", strategy="group", group_size=32),
    "int4_g128": QuantScheme(type="int4", method="rtn", strategy="group", group_size=128),
    "int4_asym": QuantScheme(type="int4", method="rtn", strategy="group", group_size=32, symmetric=False),
    "int4_imatrix": QuantScheme(type="int4", method="rtn", strategy="group", group_size=32, importance=True),
    "int4_awq": QuantScheme(type="int4", method="awq", strategy="group", group_size=32),
    "int4_row": QuantScheme(type="int4", method="rtn", strategy="channel", group_size=None),
    "int8": QuantScheme(type="int8", method="rtn", strategy="group", group_size=32),
    "int8_channel": QuantScheme(type="int8", method="rtn", strategy="channel", group_size=None),
    "int8_row": QuantScheme(type="int8", method="rtn", strategy="channel", group_size=None),
    "fp8": QuantScheme(type="fp8", method="rtn", strategy="channel", group_size=None),
    "fp8_tensor": QuantScheme(type="fp8", method="rtn", strategy="tensor", group_size=None),
}


def resolve_scheme(value: str | dict | QuantScheme) -> QuantScheme:
    """A preset name, a dict of fields (optionally ``preset: NAME`` plus overrides), or a scheme."""
    if isinstance(value, QuantScheme):
        return value
    if isinstance(value, str):
        try:
            return PRESET_SCHEMES[value]
        except KeyError:
            raise ValueError(f"unknown scheme preset {value!r}; valid presets: {', '.join(PRESET_SCHEMES)}") from None
    if isinstance(value, dict):
        fields = dict(value)
        preset = fields.pop("preset", None)
        if preset is not None:
            base = resolve_scheme(preset).model_dump()
            base.update(fields)
            fields = base
        return QuantScheme.model_validate(fields)
    raise TypeError(f"a scheme is a preset name or a mapping, got {type(value).__name__}")


def precision_rank(scheme: QuantScheme) -> int:
    """Orders schemes by precision: keep > fp8/int8 > int4. Used to lift KV producers."""
    return {"keep": 3, "fp8": 2, "int8": 2, "int4": 1}[scheme.type]
