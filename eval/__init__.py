"""Evaluation harness: perplexity, KL divergence, latency and tower checks for artifacts.

Import rule: ``eval`` reads artifacts (GGUF files, safetensors folders, manifests) and uses
third-party runtimes (transformers, llama-cpp-python); it imports nothing from ``quantize``
or ``calibrate``, so results never depend on the code that produced the artifact.
"""
