"""Evaluation harness: perplexity, KL divergence, latency and tower checks for artifacts.

Import rule: ``eval`` reads artifacts (GGUF files, safetensors folders, manifests) and uses
third-party runtimes (transformers, llama-cpp-python). It may import ``calibrate`` for the
held-out evaluation data only (``eval.heldout``), and never imports ``quantize``, so results
never depend on the code that produced the artifact.

Layout: ``heldout`` (held-out text and media), ``windows`` (llama.cpp-style perplexity windows),
``kl`` (the reference's top-k log-prob file and KL statistics), ``backends/`` (transformers,
llama.cpp), ``latency`` (timing protocol), ``device`` (fingerprints; ``tegrastats`` and
``nvpmodel`` parsers), ``towers`` (vision / audio embedding checks), ``results`` (the JSON
schema), ``run`` (one artifact end to end), ``report`` + ``svg`` (markdown and HTML), ``cli``.
"""
