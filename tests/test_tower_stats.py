"""Tower activation statistics: hand-computed from captured inputs, and they help RTN."""
import torch
from torch import nn

from quantize.methods.rtn import quantize_rtn
from quantize.schemes import resolve_scheme
from quantize.tower_stats import collect_tower_stats, tower_importance


def test_linear_and_conv_stats_hand_computed():
    torch.manual_seed(0)
    net = nn.Module()
    net.tower = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(2), nn.Linear(16, 5))
    net.tower.add_module("dw", nn.Conv2d(4, 4, 3, groups=4))
    x = torch.randn(2, 3, 4, 4)
    stats = collect_tower_stats(net, "tower", [lambda: net.tower[2](net.tower[1](net.tower[0](x)))])
    conv_in = x
    lin_in = net.tower[1](net.tower[0](x))
    per_channel = torch.stack([conv_in[:, c].pow(2).mean() for c in range(3)])
    assert torch.allclose(stats["tower.0.weight"], per_channel.repeat_interleave(9))
    assert stats["tower.0.weight"].numel() == net.tower[0].weight[0].numel()
    assert torch.allclose(stats["tower.2.weight"], lin_in.reshape(-1, 16).pow(2).mean(0))
    assert "tower.dw.weight" not in stats  # depthwise: no statistics by design


def test_tower_importance_on_tiny_model_improves_weighted_error(tiny_random):
    from transformers import AutoProcessor, Gemma3nForConditionalGeneration

    from calibrate import build_calibration
    from calibrate.config import CalibrationConfig

    torch.set_num_threads(1)
    proc = AutoProcessor.from_pretrained(tiny_random)
    cal = build_calibration(CalibrationConfig.model_validate({"images": {"n_samples": 1}, "audio": {"n_samples": 1}, "text": {"n_samples": 1, "seq_len": 32}}), proc, seed=0)
    model = Gemma3nForConditionalGeneration.from_pretrained(tiny_random).eval()
    stats = tower_importance(model, cal.images, cal.audio)
    assert any(k.startswith("model.vision_tower.") for k in stats)
    assert any(k.startswith("model.audio_tower.") for k in stats)
    params = dict(model.named_parameters())
    plain, weighted = resolve_scheme("int8_channel"), resolve_scheme({"preset": "int8_channel", "importance": True})
    better = 0
    names = [k for k in stats if params[k].dim() >= 2][:12]
    for name in names:
        w = params[name].detach()
        imp = stats[name]
        w2 = w.reshape(w.shape[0], -1)
        err = lambda q: ((q.dequantize().reshape(w2.shape) - w2).pow(2) * imp).sum().item()  # noqa: E731
        e_plain, e_imp = err(quantize_rtn(name, w, plain)), err(quantize_rtn(name, w, weighted, importance=imp))
        assert e_imp <= e_plain * (1 + 1e-6), name
        better += e_imp < e_plain
    assert better >= len(names) // 2
