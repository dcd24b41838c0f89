"""safetensors export: an HF model folder that transformers (and vLLM) load as it is.

Two formats (``SafetensorsExport.format``):

- ``compressed-tensors`` (``<out>/safetensors``): the layout llm-compressor writes. Our own codes
  and scales, packed with compressed-tensors' functions, streamed into shards; config.json gets a
  ``quantization_config`` built with its classes. See ``layout`` for what each tensor becomes.
- ``bitsandbytes`` (``<out>/safetensors-bnb-<nf4|fp4|int8>``): transformers loads the source model
  with bitsandbytes quantizing its Linear layers and saves it. bitsandbytes has its own formats,
  so this path re-quantizes from the source weights instead of using our codes.

Import rule: may import ``quantize`` (plan, source, qtensor, errors), compressed-tensors,
safetensors, transformers and bitsandbytes; nothing imports this package but the pipeline.
"""
from __future__ import annotations

from quantize.formats.safetensors.writer import (
    export_notes,
    predicted_bytes,
    validate_safetensors,
    write_safetensors,
)

__all__ = ["export_notes", "predicted_bytes", "validate_safetensors", "write_safetensors"]
