"""Quantize Gemma 3n: recipes, plans, algorithms, the one orchestrator and the format writers.

Import rule: ``quantize`` may import ``calibrate``; it never imports ``eval``. Only the CLI
(``quantize.cli``) wires stages together for the command line.
"""
