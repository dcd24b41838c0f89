"""quantize fit: the optimiser against brute force, the device budget against hand-computed
bytes, and the written plain recipe against the GGUF that fit wrote (byte for byte, types read
back with gguf's own reader)."""
from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantize.fit.optimise import allocate

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "quantize", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})


def _brute(costs, values, cap):
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        if sum(c[j] for c, j in zip(costs, pick)) <= cap:
            v = sum(x[j] for x, j in zip(values, pick))
            best = v if best is None or v < best else best
    return best


@pytest.mark.parametrize("seed", range(12))
def test_allocate_finds_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 6)
    costs = [sorted(rng.sample(range(1, 30), rng.randint(2, 4))) for _ in range(n)]
    # more bytes, less error: like GGUF types (values strictly decrease with cost)
    values = [sorted((rng.random() for _ in c), reverse=True) for c in costs]
    lo, hi = sum(c[0] for c in costs), sum(c[-1] for c in costs)
    for cap in (lo - 1, lo, (lo + hi) // 2, hi - 3, hi + 5):
        want = _brute(costs, values, cap)
        got = allocate(costs, values, cap)
        if want is None:
            assert got is None
            continue
        assert sum(c[j] for c, j in zip(costs, got)) <= cap
        assert sum(v[j] for v, j in zip(values, got)) == pytest.approx(want, abs=1e-12)


def test_allocate_in_coarse_units_still_fits_the_real_budget():
    rng = random.Random(7)
    costs = [[rng.randint(1000, 5000), rng.randint(5001, 9000)] for _ in range(8)]
    values = [[1.0 + rng.random(), rng.random()] for _ in range(8)]
    cap = sum(c[0] for c in costs) + 9000
    got = allocate(costs, values, cap, unit=997)
    assert got is not None and sum(c[j] for c, j in zip(costs, got)) <= cap
    # coarse units cost at most what rounding can take: never better than the exact optimum
    assert sum(v[j] for v, j in zip(values, got)) >= _brute(costs, values, cap) - 1e-12


def _recipe(tmp: Path, fit: dict, name="fit-tiny", extra_gguf=None) -> Path:
    data = {"version": 1, "name": name, "model": "builtin:tiny-trained", "output": str(tmp / "out"),
            "calibration": {"text": {"source": "embedded", "n_samples": 1, "seq_len": 96}},
            "exports": {"gguf": {"mmproj": False, "fit": fit, **(extra_gguf or {})}}}
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_fit_device_profile_prints_the_memory_breakdown(tmp_path, tiny_trained):
    tc = json.loads((Path(tiny_trained) / "config.json").read_text())["text_config"]
    r = _cli("fit", _recipe(tmp_path, {"budget": "1GB"}), "--device-profile", "jetson-orin-nano-8gb",
             "--context", 4096, "--dry-run")
    assert r.returncode == 0, r.stderr
    # hand-computed for the tiny config: 25 layers, the last 5 share K/V, so 20 store it; layer
    # types repeat 4 sliding + 1 full, so 16 sliding (64-token window) and 4 full (4096 tokens);
    # 2 kv heads x 64 dims x (K and V) x 2 bytes (f16) = 512 bytes per layer and token
    assert (tc["num_hidden_layers"], tc["num_kv_shared_layers"], tc["num_key_value_heads"], tc["head_dim"],
            tc["sliding_window"]) == (25, 5, 2, 64, 64)
    kv = 512 * (4 * 4096 + 16 * 64)
    assert kv == 8_912_896
    assert f"{kv:,} bytes" in r.stdout and "20 layers store K/V" in r.stdout
    compute = 4 * 512 * (4352 + 3 * 512 + 8 * 256 + 25 * 256)
    usable = 8 * 10**9 - int(1.5 * 2**30)
    assert f"({usable - kv - compute:,} bytes)" in r.stdout
    assert "https://www.nvidia.com/" in r.stdout and "assumption" in r.stdout
    # 6 GB for a 100 MB model: every group at its largest type, shown per group
    rows = [l.split() for l in r.stdout.splitlines() if l.startswith(("blk.", "token_embd", "per_layer_token_embd"))]
    assert len(rows) == 25 * 7 + 20 * 2 + 2
    assert {row[1] for row in rows} == {"F16"} and {row[2] for row in rows} == {"16.000"}
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.fit.yaml").exists()


def test_fit_budget_too_small_is_one_line_and_writes_nothing(tmp_path, tiny_trained):
    r = _cli("fit", _recipe(tmp_path, {"budget": "20MB"}))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "below the smallest text GGUF" in r.stderr and "valid: at least" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_fit_unknown_profile_lists_valid_ones(tmp_path):
    r = _cli("fit", _recipe(tmp_path, {"budget": "1GB"}), "--device-profile", "jetson-nano")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "jetson-nano" in r.stderr and "jetson-orin-nano-8gb" in r.stderr and "phone-6gb" in r.stderr
    r = _cli("run", _recipe(tmp_path, {"budget": "1GB", "devices": "x"}))
    assert r.returncode == 2 and "exports.gguf.fit.devices" in r.stderr


def test_fit_probes_key_lists_valid_modes(tmp_path):
    r = _cli("run", _recipe(tmp_path, {"budget": "1GB", "probes": "layer"}))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "exports.gguf.fit.probes" in r.stderr and "'gradient'" in r.stderr and "'group'" in r.stderr


def test_fit_vision_without_a_runnable_mmproj_is_refused(tmp_path, tiny_trained):
    # the tiny model's text width (256) differs from its vision width (2048): mtmd cannot run it,
    # so there is no mmproj to budget for
    r = _cli("fit", _recipe(tmp_path, {"device": "phone-6gb", "vision": True}), "--dry-run")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "valid: vision off" in r.stderr


BUDGET = 36_000_000  # the tiny model's text GGUF: about 32.8 MB with every group at its cheapest type, 100 MB all F16


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_trained):
    """`quantize run` on a recipe with exports.gguf.fit: measure, choose, write the plain recipe, run it."""
    tmp = tmp_path_factory.mktemp("fit")
    recipe = _recipe(tmp, {"budget": str(BUDGET), "samples": 1},
                     extra_gguf={"tensor_types": [{"match": ["blk.0.ffn_down.weight"], "type": "Q8_0"}]})
    r = _cli("run", recipe, "--no-eval")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, r.stdout


def test_fit_writes_a_plain_recipe_with_the_chosen_types(fitted):
    from gguf import GGUFReader

    tmp, stdout = fitted
    plain = yaml.safe_load((tmp / "out.fit.yaml").read_text())
    gguf = plain["exports"]["gguf"]
    assert "fit" not in gguf and gguf["fitted"]["budget_bytes"] == BUDGET and gguf["fitted"]["predicted_kl"] > 0
    rules = {n: rule["type"] for rule in gguf["tensor_types"] for n in rule["match"]}
    assert len(rules) == 25 * 7 + 20 * 2 + 2 and rules["blk.0.ffn_down.weight"] == "Q8_0"  # the pinned rule stays
    path = tmp / "out" / "fit-tiny-auto.gguf"
    assert path.stat().st_size <= BUDGET
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert {n: types[n] for n in rules} == rules
    quantized = {t for t in rules.values() if t.startswith("Q")}
    assert len(quantized) >= 3, rules  # a real trade between types, not one type everywhere
    # dead k/v of the KV-shared layers stay placeholders, never a group
    assert "blk.24.attn_k.weight" not in rules and types["blk.24.attn_k.weight"] == "IQ1_S"
    manifest = json.loads((tmp / "out" / "manifest.json").read_text())
    assert manifest["recipe"]["exports"]["gguf"]["fitted"] == gguf["fitted"]
    assert f"{path.stat().st_size:,} bytes (budget {BUDGET:,})" in stdout


def test_the_plain_recipe_reproduces_the_gguf_byte_for_byte(fitted):
    tmp, _ = fitted
    r = _cli("run", tmp / "out.fit.yaml", "--out", tmp / "again", "--no-eval")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "probing" not in r.stderr  # a plain recipe: nothing measured again
    assert (tmp / "again" / "fit-tiny-auto.gguf").read_bytes() == (tmp / "out" / "fit-tiny-auto.gguf").read_bytes()


def test_probe_memory_is_one_layer_and_the_output_layer_and_refused_where_it_cannot_fit(tmp_path, tiny_trained):
    """The streamed probes' memory estimate from transformers' own module shapes, by hand: one
    decoder layer and the tied output layer in fp32, each twice (float and fake-quantized), the
    probe tokens' table rows, 4 AltUp hidden states per kept state (streams, or the gradient
    pass's layer inputs and gradients) plus two, one chunk of float64 log-probabilities; a
    machine with less is refused in one line before any work."""
    import torch
    from transformers import Gemma3nForConditionalGeneration

    from quantize.errors import QuantizeError
    from quantize.fit import measure
    from quantize.fit.streamed_probe import POSITIONS_PER_CHUNK
    from quantize.model import Checkpoint

    ckpt = Checkpoint(Path(tiny_trained))
    model = Gemma3nForConditionalGeneration.from_pretrained(str(tiny_trained), dtype=torch.float32)
    lm = model.model.language_model
    tc = model.config.text_config
    layer = sum(p.numel() for p in lm.layers[0].parameters())
    head = model.lm_head.weight.numel()
    assert model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()  # tied: one table
    # the gradient pass keeps every layer's input (25) and two sets of 8 label draws' gradients (and the base's)
    streams = 25 + 2 * 8 + 1
    rows = 100 * (tc.hidden_size + tc.num_hidden_layers * tc.hidden_size_per_layer_input)
    want = (8 * layer + 8 * head + 4 * rows + (streams + 2) * 100 * 4 * 4 * tc.hidden_size
            + 8 * 4 * POSITIONS_PER_CHUNK * tc.vocab_size)
    assert measure.prober_bytes(ckpt, 100) == want
    # per group: one stream per probed group
    assert measure.prober_bytes(ckpt, 100, 217, "group") == want + (217 - streams) * 100 * 16 * tc.hidden_size
    measure.check_prober_memory(ckpt, 100, available=want)  # just fits
    with pytest.raises(QuantizeError) as e:
        measure.check_prober_memory(ckpt, 100, available=want // 2)
    msg = str(e.value)
    assert "\n" not in msg and str(tiny_trained) in msg and "GiB of memory is available" in msg and "Valid:" in msg
