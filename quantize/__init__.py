"""Quantize Gemma 3n: recipes, plans, algorithms, the one orchestrator and the format writers.

Import rule: ``quantize`` may import ``calibrate``; its core (recipes, plans, methods, formats,
the pipeline, the sequential engine) never imports ``eval``. The wiring modules may, lazily,
inside functions: ``quantize.cli`` (the command line), ``quantize.evaluation`` (the run's eval
step, which the pipeline calls only when a recipe has an ``eval:`` section), ``quantize.sweep``
(evaluation on Ray workers) and ``quantize.fit`` (the fitted run's measured KL). ``eval`` never
imports ``quantize``, so a measurement never depends on the code that produced the artifact.
"""
