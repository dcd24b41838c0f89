"""Activation statistics of the vision and audio towers on calibration images and clips.

For every Linear and ungrouped Conv2d/Conv1d of a tower, the mean squared input per weight
column (the layout ``QuantizedTensor`` uses: a conv's columns are (in_channel, kh, kw) in
row-major order, so a channel's statistic repeats over its kernel taps). These feed the
importance-weighted RTN of ``quantize.methods.rtn`` like llama.cpp's imatrix feeds its
quantizer. Grouped (depthwise) convolutions mix no channels: each output row sees a single
input channel, so a per-column weight would be the same for all of a row's columns and cannot
change the chosen scale; they get no statistics.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn


def _column_stats(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    if isinstance(module, nn.Linear):
        return x.detach().float().reshape(-1, x.shape[-1]).pow(2).mean(0)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1:
        per_channel = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1).pow(2).mean(1)
        taps = 1
        for k in module.kernel_size:
            taps *= k
        return per_channel.repeat_interleave(taps)
    return None


def collect_tower_stats(model, prefix: str, run: Iterable) -> dict[str, torch.Tensor]:
    """Mean squared input per column for each Linear/Conv weight under ``prefix`` (a module path
    such as ``model.vision_tower``), while ``run`` (an iterable of thunks) drives the tower.
    Returns checkpoint weight names -> statistics."""
    tower = model.get_submodule(prefix)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, module in tower.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        key = f"{prefix}.{name}.weight"

        def hook(mod, args, _key=key):
            s = _column_stats(mod, args[0])
            if s is not None:
                sums[_key] = sums.get(_key, 0) + s
                counts[_key] = counts.get(_key, 0) + 1

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for thunk in run:
                thunk()
    finally:
        for h in hooks:
            h.remove()
    return {k: sums[k] / counts[k] for k in sums}


def tower_importance(model, images: torch.Tensor | None, audio: Mapping | Iterable | None) -> dict[str, torch.Tensor]:
    """Statistics for the vision tower (on pixel values) and the audio tower (on mel features)."""
    stats: dict[str, torch.Tensor] = {}
    if images is not None and len(images):
        runs = [lambda i=i: model.model.get_image_features(pixel_values=images[i : i + 1]) for i in range(len(images))]
        stats.update(collect_tower_stats(model, "model.vision_tower", runs))
    if audio:
        # get_audio_features takes the *padding* mask (the model's forward passes
        # ~input_features_mask); the feature extractor's mask marks valid frames.
        runs = [lambda f=f, m=m: model.model.get_audio_features(f, ~m.bool()) for f, m in audio]
        stats.update(collect_tower_stats(model, "model.audio_tower", runs))
    return stats
