"""The transformers we run on: the tested version range and the internals we rely on.

The sequential engine (``quantize.sequential``) calls Gemma 3n's decoder layers one at a time
with the arguments ``Gemma3nTextModel.forward`` passes them, so it depends on transformers
internals that carry no stability promise: ``cache_utils.KVSharingDict`` (the K/V a "store"
layer leaves for its consumers), ``Gemma3nTextConfig.kv_sharing_modes`` and the decoder layer's
``shared_kv_states`` / ``per_layer_input`` / ``position_embeddings`` parameters, and
``modeling_gemma3n.apply_rotary_pos_emb`` (the fp8 KV-cache hooks). ``check_transformers``
refuses, in the first second of a calibrated run, a version outside the tested range or one
where any of those moved, with one line naming the version and what is missing.
"""
from __future__ import annotations

import inspect

from quantize.errors import QuantizeError

# pyproject.toml declares the same range; tests run on 5.24.
TRANSFORMERS_MIN = (5, 24)
TRANSFORMERS_BELOW = (6, 0)
TESTED_RANGE = ">=5.24,<6"

LAYER_PARAMETERS = ("position_embeddings", "per_layer_input", "shared_kv_states", "attention_mask", "position_ids")


def _release(version: str) -> tuple[int, int]:
    parts = []
    for p in version.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (2 - len(parts)))  # type: ignore[return-value]


def missing_internals() -> list[str]:
    """The internals the sequential engine needs that this transformers lacks (empty: all there)."""
    missing = []
    try:
        from transformers.cache_utils import KVSharingDict  # noqa: F401
    except ImportError:
        missing.append("transformers.cache_utils.KVSharingDict")
    try:
        from transformers.models.gemma3n import modeling_gemma3n as mg
        from transformers import Gemma3nTextConfig
    except ImportError:
        return missing + ["transformers.models.gemma3n"]
    if not hasattr(mg, "apply_rotary_pos_emb"):
        missing.append("modeling_gemma3n.apply_rotary_pos_emb")
    if not isinstance(getattr(Gemma3nTextConfig, "kv_sharing_modes", None), property):
        missing.append("Gemma3nTextConfig.kv_sharing_modes")
    layer = getattr(mg, "Gemma3nTextDecoderLayer", None)
    if layer is None:
        missing.append("modeling_gemma3n.Gemma3nTextDecoderLayer")
    else:
        params = inspect.signature(layer.forward).parameters
        missing += [f"Gemma3nTextDecoderLayer.forward({p}=)" for p in LAYER_PARAMETERS if p not in params]
    return missing


def check_transformers(version: str | None = None) -> None:
    """Raise ``QuantizeError`` (one line) unless transformers is in the tested range with every
    internal the sequential engine uses."""
    if version is None:
        import transformers

        version = transformers.__version__
    if not (TRANSFORMERS_MIN <= _release(version) < TRANSFORMERS_BELOW):
        raise QuantizeError(f"transformers {version} is outside the tested range {TESTED_RANGE} "
                            f"(pip install 'transformers{TESTED_RANGE}')")
    missing = missing_internals()
    if missing:
        raise QuantizeError(f"transformers {version} lacks internals the calibration engine uses: {', '.join(missing)} "
                            f"(tested range {TESTED_RANGE})")
