"""AWQ end to end: both exports compute the model the quantizer saw, and GPTQ codes are never
rounded twice.

Reference: the fake-quantized model, computed by transformers: the source model loaded whole and
run through the sequential engine with the schemes and calibration batches that
``quantize.pipeline.run`` gave it (captured by wrapping ``quantize.sequential.quantize_text_decoder``).
The engine replaces every quantized decoder weight by its dequantized value in place and
rescales what AWQ changes (``pre_feedforward_layernorm``, and gate/up/down whether quantized or
kept); nothing of the writers or ``TensorSource`` takes part. Its logits (transformers' forward) are compared
with the GGUF in llama.cpp (llama-cpp-python) and with the safetensors folder loaded by
transformers through compressed-tensors, over held-out text; a GPTQ recipe gives the same
measurements as the yardstick.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")

# the F32 export's logits are the source model in llama.cpp; one tokenizer check, shared
from test_gguf_llamacpp import f32_logits, heldout_tokens, llama_logits, mean_kl  # noqa: F401  (fixtures)

from quantize.errors import ExportError
from quantize.pipeline import run
from quantize.recipe import parse_recipe

pytestmark = pytest.mark.llamacpp

KEEP_REST = {"token_embeddings": "keep", "per_layer_embeddings": "keep", "per_layer_projections": "keep",
             "altup_laurel": "keep", "vision": "keep", "audio": "keep", "embedders": "keep"}
CALIBRATION = {"text": {"source": "embedded", "n_samples": 8, "seq_len": 128},
               "images": {"n_samples": 0}, "audio": {"n_samples": 0}, "multimodal_samples": 0}
# Per layer, MLP schemes beside int4 AWQ: every case where AWQ changes a float weight that the
# engine does not quantize with AWQ itself.
COMBOS = {
    1: {"mlp.gate_proj": "keep"},                                 # kept gate, scaled by the norm's s
    2: {"mlp.up_proj": "keep"},                                   # kept up, scaled for the norm and for down
    3: {"mlp.gate_proj": "int4_gptq", "mlp.down_proj": "int4"},   # GPTQ gate on AWQ-scaled inputs, RTN down
    4: {"mlp.up_proj": "keep", "mlp.down_proj": "keep"},          # kept up, scaled by the norm only
    5: {"mlp.gate_proj": "keep", "mlp.up_proj": "keep"},          # only down is AWQ: kept up's rows
    6: {"mlp.gate_proj": "int4", "mlp.up_proj": "int4"},          # RTN up scaled for down
}
LAYERS = "model.language_model.layers"
# Measured on the tiny trained model (300 held-out tokens): see test bodies.
SAFETENSORS_TOL = 1e-4  # max |logit difference|, as tests/test_safetensors.py holds GPTQ to
EXPORT_KL_RATIO = 2.0   # AWQ's GGUF against its fake-quantized model, relative to GPTQ's
MUST_SHOW_RATIO = 1.2   # AWQ's GGUF against the source model, relative to GPTQ's at the same size


def recipe(folder, out, text, overrides=(), **gguf):
    return parse_recipe({
        "name": "t", "model": str(folder), "output": str(out), "seed": 0, "calibration": CALIBRATION,
        "towers": {"text": text, **KEEP_REST}, "overrides": list(overrides),
        "exports": {"gguf": {"mix": "auto", "mmproj": False, **gguf}, "safetensors": {"format": "compressed-tensors"}},
    })


def run_with_reference(r):
    """``run(r)`` and the fake-quantized model: a whole transformers model of the source, run
    through the sequential engine with the schemes and calibration batches the pipeline gave it
    (the pipeline streams the model from the checkpoint; the engine computes the same either
    way), so the engine replaces its decoder weights by their dequantized values and rescales
    what AWQ changes, in place."""
    from transformers import Gemma3nForConditionalGeneration

    import quantize.sequential as seq

    seen = {}
    real = seq.quantize_text_decoder

    def spy(model, schemes, batches, **kwargs):
        seen.update(schemes=dict(schemes), batches=list(batches), kwargs=kwargs)
        return real(model, schemes, batches, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(seq, "quantize_text_decoder", spy)
        result = run(r, progress=False)
    fake = Gemma3nForConditionalGeneration.from_pretrained(str(r.model), dtype=torch.float32).eval()
    kwargs = {k: v for k, v in seen["kwargs"].items() if k in ("device", "kv_fp8", "compute_dtype")}
    real(fake, seen["schemes"], seen["batches"], progress=False, **kwargs)
    return result, fake


@torch.no_grad()
def hf_logits(model, toks) -> np.ndarray:
    return model(input_ids=torch.tensor([toks])).logits[0].double().numpy()


def measure(folder, out, toks, text, overrides=(), fidelity=True):
    """(run result, GGUF logits in llama.cpp, and with ``fidelity``: KL of those against the
    fake-quantized model in transformers, max |logit difference| of the safetensors folder
    loaded by transformers against that model)."""
    from transformers import Gemma3nForConditionalGeneration

    r = recipe(folder, out, text, overrides)
    result, fake = run_with_reference(r) if fidelity else (run(r, progress=False), None)
    got = llama_logits(next(p for p in result.artifacts if p.suffix == ".gguf"), toks)
    if not fidelity:
        return result, got, None, None
    ref = hf_logits(fake, toks)
    st = Gemma3nForConditionalGeneration.from_pretrained(str(result.out_dir / "safetensors"), dtype=torch.float32).eval()
    diff = float(np.abs(hf_logits(st, toks[:128]) - ref[:128]).max())
    return result, got, mean_kl(ref, got), diff


@pytest.fixture(scope="module")
def gptq(tiny_trained, heldout_tokens, tmp_path_factory):
    _, toks = heldout_tokens
    return measure(tiny_trained, tmp_path_factory.mktemp("gptq") / "out", toks, "int4_gptq")


@pytest.fixture(scope="module")
def awq_combos(tiny_trained, heldout_tokens, tmp_path_factory):
    _, toks = heldout_tokens
    overrides = [{"match": [f"*layers.{i}.{p}.weight"], "scheme": s} for i, c in COMBOS.items() for p, s in c.items()]
    return measure(tiny_trained, tmp_path_factory.mktemp("awq") / "out", toks, "int4_awq", overrides)


@pytest.mark.slow
def test_awq_exports_compute_the_fake_quantized_model(gptq, awq_combos):
    """The GGUF and the safetensors of an AWQ recipe (kept, RTN and GPTQ linears beside AWQ
    ones) match the engine's fake-quantized model as closely as a GPTQ recipe's do.
    Before the fix the GGUF carried the checkpoint's norms (unscaled) and both formats the
    checkpoint's kept gate/up: KL and logit differences orders of magnitude above GPTQ's."""
    _, _, kl_gptq, diff_gptq = gptq
    result, _, kl_awq, diff_awq = awq_combos
    print(f"export vs fake-quantized model: GGUF KL awq {kl_awq:.2e} gptq {kl_gptq:.2e}; "
          f"safetensors max |dlogit| awq {diff_awq:.2e} gptq {diff_gptq:.2e}")
    assert diff_gptq < SAFETENSORS_TOL and diff_awq < SAFETENSORS_TOL
    assert kl_awq <= EXPORT_KL_RATIO * kl_gptq

    # the engine did rescale what the recipe keeps, and the manifest says what each GGUF tensor holds
    codes = json.loads((result.out_dir / "manifest.json").read_text())["gguf"]["tensors"]
    assert codes["blk.1.ffn_gate.weight"] == {"method": "keep", "grid": "F16", "source": "AWQ-rescaled float weights"}
    assert codes["blk.2.ffn_up.weight"]["source"] == "AWQ-rescaled float weights"
    assert codes["blk.1.ffn_norm.weight"] == {"method": "keep", "grid": "F32", "source": "AWQ-rescaled float weights"}
    assert codes["blk.0.ffn_up.weight"] == {"method": "awq", "grid": "Q4_0", "source": "calibrated codes"}
    assert codes["blk.3.ffn_gate.weight"] == {"method": "gptq", "grid": "Q4_0", "source": "calibrated codes"}
    assert codes["blk.0.attn_q.weight"]["method"] == "rtn"  # AWQ cannot be absorbed before attention


# Mean KL against the F32 export over three 300-token held-out windows (tiny trained model,
# 8 x 128 calibration tokens; int4 g32, all Q4_0, 78.8 MB): F16 of the unquantized model 4.6e-8
# (the floor), RTN 4.3e-7, importance RTN 6.3e-7, the int4_awq preset 4.9e-7, GPTQ 2.0e-7,
# AWQ MLP + GPTQ attention 1.9e-7 (0.95x GPTQ), GPTQ MLP + RTN attention 2.6e-7. AWQ's scales
# can be absorbed only before the MLP (quantize.methods.awq), so the preset rounds attention to
# nearest: that, not the MLP, is its gap to GPTQ (2.5x). An AWQ recipe that gives attention GPTQ
# is within the issue's 1.2x; the preset alone is not, on this model.
@pytest.mark.slow
def test_awq_gguf_is_as_good_as_gptq_at_the_same_size(tiny_trained, heldout_tokens, f32_logits, gptq, tmp_path):
    """Must show (issue 12): an AWQ recipe's GGUF (AWQ on the MLP, GPTQ where AWQ cannot be
    absorbed) is within 1.2x of the GPTQ recipe's KL against the source model in llama.cpp (its
    F32 export), with the same GGUF type for every tensor (int4 g32 -> Q4_0)."""
    _, toks = heldout_tokens
    attention_gptq = [{"match": ["*self_attn*"], "scheme": "int4_gptq"}]
    result, got, _, _ = measure(tiny_trained, tmp_path / "out", toks, "int4_awq", attention_gptq, fidelity=False)
    g_result, g_got, _, _ = gptq
    grids = [{n: c["grid"] for n, c in json.loads((r.out_dir / "manifest.json").read_text())["gguf"]["tensors"].items()}
             for r in (result, g_result)]
    assert {n: grids[0][n] for n in grids[1]} == grids[1]  # every matrix: the same GGUF type
    assert {g for n, g in grids[0].items() if n not in grids[1]} == {"F32"}  # plus AWQ's rescaled norms
    methods = json.loads((result.out_dir / "manifest.json").read_text())["gguf"]["tensors"]
    assert methods["blk.0.ffn_gate.weight"]["method"] == "awq" and methods["blk.0.attn_q.weight"]["method"] == "gptq"
    kl, g_kl = mean_kl(f32_logits, got), mean_kl(f32_logits, g_got)
    print(f"KL against the F32 export: awq {kl:.3e}, gptq {g_kl:.3e} ({kl / g_kl:.3f}x)")
    assert kl <= MUST_SHOW_RATIO * g_kl


def test_gptq_under_a_kquant_type_is_refused_before_any_work(tiny_trained, tmp_path):
    """GPTQ codes re-encoded on a K-quant grid would be rounded twice: the CLI says which tensor,
    method and GGUF type, and what would be valid, in one line, exits 2 and writes nothing."""
    import yaml

    out = tmp_path / "out"
    spec = {"version": 1, "name": "t", "model": str(tiny_trained), "output": str(out),
            "calibration": CALIBRATION, "towers": {"text": "int4_gptq", **KEEP_REST},
            "exports": {"gguf": {"mix": "auto", "mmproj": False,
                                 "tensor_types": [{"match": ["blk.*.ffn_down.weight"], "type": "Q4_K"}]}}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(spec))
    p = subprocess.run([sys.executable, "-m", "quantize", "run", str(path)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    msg = lines[0]
    for part in ("model.language_model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", "GPTQ", "Q4_K",
                 "Q4_0", "F16", "rtn or awq", "more tensors"):
        assert part in msg, msg
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def _plan(folder, out, text, **gguf):
    from quantize.formats.base import ExportContext
    from quantize.formats.gguf import plan_text
    from quantize.model import Checkpoint
    from quantize.plan import build_plan
    from quantize.source import TensorSource

    r = recipe(folder, out, text, **gguf)
    ck = Checkpoint(folder)
    ctx = ExportContext(r, TensorSource(ck, build_plan(r, ck)), out, {})
    return {t.gguf: t for t in plan_text(ctx, r.exports.gguf).targets}


def test_awq_and_gptq_under_named_types(tiny_trained, tmp_path):
    """AWQ under a K-quant type encodes its rescaled float weights once; GPTQ keeps Q4_0 (its
    exact type) or a float type of its dequantized codes, and is refused on any other block grid."""
    k = [{"match": ["blk.*.ffn_*.weight"], "type": "Q4_K"}]
    t = _plan(tiny_trained, tmp_path, "int4_awq", tensor_types=k)
    assert not t["blk.0.ffn_up.weight"].dequantize and t["blk.0.ffn_up.weight"].method == "awq"
    assert t["blk.0.attn_q.weight"].choice.exact  # AWQ there is RTN (nothing absorbs the scale): Q4_0 codes
    for qtype, ok in (("Q4_0", True), ("F16", True), ("Q8_0", False), ("Q5_K", False)):
        rule = [{"match": ["blk.3.attn_v.weight"], "type": qtype}]
        if ok:
            target = _plan(tiny_trained, tmp_path, "int4_gptq", tensor_types=rule)["blk.3.attn_v.weight"]
            assert target.choice.exact == (qtype == "Q4_0") and target.dequantize == (qtype == "F16")
        else:
            with pytest.raises(ExportError, match=rf"layers\.3\.self_attn\.v_proj\.weight \(blk\.3\.attn_v\.weight\) holds GPTQ .* {qtype}"):
                _plan(tiny_trained, tmp_path, "int4_gptq", tensor_types=rule)
    with pytest.raises(ExportError, match="mix Q4_K_M gives it GGUF Q6_K"):
        _plan(tiny_trained, tmp_path, "int4_gptq", mix="Q4_K_M")
