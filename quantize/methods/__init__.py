"""Quantization algorithms as pure tensor functions (no nn.Module, no I/O).

- ``rtn``: round to nearest, int4 / int8 (symmetric or not, grouped or per channel) and fp8;
  importance-weighted scale search (llama.cpp imatrix style) when the scheme asks for it;
- ``gptq``: GPTQ with dampening, act-order (static groups) and lazy block updates; from the
  input rows (``stats.GramRows``) in low-rank form when there are few tokens;
- ``awq``: activation-aware scale search and the exact absorptions Gemma 3n allows;
- ``stats``: Hessian (or its input rows) and per-column activation statistics accumulators;
- ``dispatch``: ``quantize_tensor`` for tensors quantized without a calibration pass.

Every function returns (or consumes) ``quantize.qtensor.QuantizedTensor``; the orchestration
over a model lives in ``quantize.sequential``.
"""
