"""Evaluation harness: perplexity, KL divergence, latency and tower checks for artifacts.

Import rule: ``eval`` reads artifacts (GGUF files, safetensors folders, manifests) and uses
third-party runtimes (transformers, llama-cpp-python). It may import ``calibrate`` for its
data only (``eval.heldout``: the held-out split, and calibrate's readers of text files and
``datasets`` splits), and never imports ``quantize``, so results never depend on the code that
produced the artifact.

Layout: ``heldout`` (evaluation text from any source, held-out media), ``reference`` (the
reference model from a folder or the hub cache), ``windows`` (llama.cpp-style perplexity windows),
``kl`` (the reference's top-k log-prob file and KL statistics), ``backends/`` (transformers,
llama.cpp), ``latency`` (timing protocol), ``device`` (fingerprints; ``tegrastats`` and
``nvpmodel`` parsers), ``towers`` (vision / audio embedding checks), ``results`` (the JSON
schema), ``run`` (one artifact end to end), ``report`` + ``figures`` (markdown and HTML, matplotlib figures), ``cli``.
"""
