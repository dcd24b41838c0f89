"""Fit a device: the best GGUF for a memory budget, chosen by measurement.

budget.py (sizes, KV cache, compute buffers), devices.py (device profiles and their sources),
measure.py (weight errors and KL sensitivities per tensor group), optimise.py (exact DP over
bytes), spec.py (the recipe keys), run.py (measure -> optimise -> plain recipe -> run).
"""
