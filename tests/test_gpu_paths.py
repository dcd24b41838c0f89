"""The calibration engine on CUDA (``--device cuda`` / ``cuda:N``) against the CPU path, which the
other tests check against transformers' own forward.

GPU tests (marked ``gpu``, skipped without CUDA; bench/gpu_check.sh runs them on a GPU):
GPTQ with act-order as a tensor function; the streamed pipeline calibration with GPTQ act-order,
AWQ, importance RTN, fp8 KV scales and multimodal batches; device memory per layer; ``cuda:N``
and the float flags around the run; determinism under ``torch.use_deterministic_algorithms``.
Tolerances: the CPU and the GPU sum in different orders (fp32 rounding, about 1e-6 relative),
so statistics agree to 1e-4 and a GPTQ code may differ where the error feedback lands near a
rounding tie (2% of codes at most, the GPTQ objective within 1%); static act-order scales and
RTN codes do not depend on sums and are equal. Past the first stage a flipped code changes
every later input, so there the GPU's statistics are checked against references built from its
own codes (tests/test_sequential.py's device=cuda cases). The device grammar and a CUDA device torch does
not see are checked on any machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantize.errors import RecipeError
from quantize.schemes import PRESET_SCHEMES, QuantScheme

ROOT = Path(__file__).resolve().parent.parent
gpu = pytest.mark.gpu


# -- any machine ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "cpu:0", "cudafoo", "cuda:-1", "CUDA"])
def test_recipe_refuses_a_device_outside_the_grammar(bad):
    from quantize.recipe import parse_recipe

    with pytest.raises(RecipeError) as e:
        parse_recipe({"version": 1, "name": "x", "model": "m", "output": "o", "device": bad}, "r.yaml")
    assert str(e.value) == f"r.yaml: device: device must be 'cpu', 'cuda' or 'cuda:N', got {bad!r}"


@pytest.mark.parametrize("spec", ["cpu", "cuda", "cuda:0", "cuda:7", "cuda:12", "tpu", "cuda:x", "cpu:0", "cudafoo",
                                  "cuda:-1", "CUDA", "cuda:", " cuda", ""])
def test_quantize_and_eval_read_devices_alike(spec):
    # Two parsers, one grammar: eval never imports quantize, and quantize's core not eval.
    from eval.backends import parse_device as eval_parse
    from eval.errors import EvalError
    from quantize.device import parse_device

    try:
        want = eval_parse(spec)
    except EvalError:
        with pytest.raises(ValueError):
            parse_device(spec)
    else:
        assert parse_device(spec) == want


def test_cli_refuses_a_cuda_device_torch_does_not_see(tiny_random, tmp_path):
    """cuda:N with N = the number of GPUs torch sees (none here, one on a GPU machine): one line,
    exit 2, in the first seconds (before calibration), no output folder."""
    n = torch.cuda.device_count()
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-m", "quantize", "run", "recipes/demo.yaml", "--model", str(tiny_random),
         "--out", str(out), "--no-eval", "--device", f"cuda:{n}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    want = "no CUDA device is available to torch" if n == 0 else f"torch sees {n} CUDA device(s), valid: cuda:0 .. cuda:{n - 1}"
    assert f"device cuda:{n}: {want}" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


# -- GPU ----------------------------------------------------------------------------------------

def _inputs(cols: int, seed: int, tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and correlated input rows with a few dead columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols ** 0.5)
    x[:, :3] = 0
    w = torch.randn(96, cols, generator=g) * 0.05
    return w, x


def _hessian(cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the second moment of correlated inputs with a few dead columns."""
    w, x = _inputs(cols, seed)
    return w, (x.t() @ x) / x.shape[0]


def _gptq_objective(w, qt, h) -> float:
    d = (qt.dequantize() - w).double()
    return float(torch.einsum("rc,cd,rd->", d, h.double(), d))


@gpu
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_on_cuda_matches_cpu(act_order):
    from quantize.methods.gptq import gptq_quantize

    w, h = _hessian(256, seed=1)
    scheme = QuantScheme(type="int4", method="gptq", group_size=32, act_order=act_order)
    cpu = gptq_quantize("w", w, h, scheme)
    cuda = gptq_quantize("w", w.cuda(), h.cuda(), scheme)
    for t in (cuda.codes, cuda.scales):
        assert t.device.type == "cpu"  # what the writers get
    if act_order:  # static groups: scales from the original weights, no sums involved
        assert torch.equal(cuda.scales, cpu.scales)
    else:
        torch.testing.assert_close(cuda.scales.float(), cpu.scales.float(), rtol=1e-2, atol=1e-4)
    diff = (cuda.codes.int() - cpu.codes.int()).abs()
    # A code flipped at a rounding tie changes the error fed to the row's later columns, so
    # flips can cascade along a row; the objective GPTQ minimises must not get worse.
    assert (diff == 0).float().mean() > 0.98 and int(diff.max()) <= 2
    assert _gptq_objective(w, cuda, h) == pytest.approx(_gptq_objective(w, cpu, h), rel=0.01)
    assert cuda.info["dead_columns"] == cpu.info["dead_columns"] == 3


@gpu
def test_low_rank_gptq_on_cuda_matches_cpu():
    """GPTQ from input rows (fewer tokens than columns: the low-rank factor and feedback) on
    CUDA against the CPU, with the same tolerances as the dense path above."""
    from quantize.methods.gptq import gptq_quantize
    from quantize.methods.stats import GramRows

    w, x = _inputs(512, seed=2, tokens=96)
    h = (x.t() @ x) / x.shape[0]
    scheme = QuantScheme(type="int4", method="gptq", group_size=32, act_order=True)
    cpu = gptq_quantize("w", w, GramRows(x), scheme)
    cuda = gptq_quantize("w", w.cuda(), GramRows(x.cuda()), scheme)
    assert "fallback" not in cpu.info and "fallback" not in cuda.info
    assert cuda.codes.device.type == "cpu" and torch.equal(cuda.scales, cpu.scales)
    diff = (cuda.codes.int() - cpu.codes.int()).abs()
    assert (diff == 0).float().mean() > 0.98 and int(diff.max()) <= 2
    assert _gptq_objective(w, cuda, h) == pytest.approx(_gptq_objective(w, cpu, h), rel=0.01)
    assert cuda.info["dead_columns"] == cpu.info["dead_columns"] == 3


CALIBRATION = {
    "text": {"source": "embedded", "n_samples": 2, "seq_len": 64},
    "images": {"source": "embedded", "n_samples": 1},
    "audio": {"source": "embedded", "n_samples": 1},
    "multimodal_samples": 2,
}


def _recipe(model, tmp_path, device: str):
    """GPTQ act-order everywhere, AWQ on layer 1's MLP, importance RTN (int8) on layer 2,
    fp8 KV scales, image and audio batches."""
    from quantize.recipe import Recipe, load_recipe

    r = load_recipe(str(ROOT / "recipes" / "demo.yaml"), model=str(model), output=str(tmp_path / "out"))
    data = r.model_dump(mode="json", exclude_none=True)
    data["calibration"] = CALIBRATION
    data["towers"] = {**data["towers"], "text": {"preset": "int4_gptq", "act_order": True},
                      "vision": {"preset": "int8_channel", "importance": True}}
    data["overrides"] = [{"match": ["*layers.1.mlp.*"], "scheme": "int4_awq"},
                         {"match": ["*layers.2.*_proj*"], "scheme": {"preset": "int8", "importance": True}}]
    data["kv_cache"] = {"fp8": True}
    data["device"] = device
    return Recipe.model_validate(data)


@gpu
def test_auto_compute_dtype_on_cuda(tiny_random, tmp_path):
    """``compute_dtype: auto`` on a CUDA device: bfloat16 for a decoder stored in bf16 exactly
    where the GPU multiplies bf16 in hardware (the reference: torch's own check without
    emulation), float32 for one stored in float32 whatever the GPU."""
    import shutil

    from safetensors.torch import load_file, save_file

    from quantize.device import native_bf16
    from quantize.pipeline import prepare, resolve_compute_dtype
    from quantize.recipe import Recipe, load_recipe

    dev = torch.device("cuda", torch.cuda.current_device())
    hardware = torch.cuda.is_bf16_supported(including_emulation=False)  # asks the current device: dev
    assert native_bf16(dev)[0] == hardware
    bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_random, bf16)
    ts = load_file(str(bf16 / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ts.items()},
              str(bf16 / "model.safetensors"), metadata={"format": "pt"})
    for folder, want in ((bf16, "bfloat16" if hardware else "float32"), (tiny_random, "float32")):
        r = load_recipe(str(ROOT / "recipes" / "demo.yaml"), model=str(folder), output="unused")
        recipe = Recipe.model_validate({**r.model_dump(mode="json", exclude_none=True), "device": "cuda",
                                        "compute_dtype": "auto"})
        dtype, why = resolve_compute_dtype(recipe, *prepare(recipe))
        assert dtype == want, why


def _on_cpu(result) -> None:
    for name, qt in result.tensors.items():
        for t in (qt.codes, qt.scales, qt.zero_points):
            assert t is None or t.device.type == "cpu", name
    for d in (result.updated, result.importance):
        assert all(t.device.type == "cpu" for t in d.values())
    for r in result.rescaled.values():
        assert all(t is None or t.device.type == "cpu" for t in (r.cols, r.rows))


@gpu
def test_streamed_calibration_on_cuda_matches_cpu(tiny_random, tmp_path):
    """pipeline._calibrate on the streamed model with multimodal batches: GPTQ act-order, AWQ,
    importance RTN and KV scales on the GPU agree with the CPU run."""
    from quantize.pipeline import _calibrate, prepare

    runs = {}
    for dev in ("cpu", "cuda"):
        recipe = _recipe(tiny_random, tmp_path, dev)
        ckpt, plan = prepare(recipe)
        runs[dev] = _calibrate(recipe, ckpt, plan, progress=False, spill=tmp_path / f"spill-{dev}")
    (m_cpu, cpu, imp_cpu), (m_gpu, gpu, imp_gpu) = runs["cpu"], runs["cuda"]
    assert any(s["kind"] == "image" for s in m_gpu["multimodal"]["samples"])
    assert any(s["kind"] == "audio" for s in m_gpu["multimodal"]["samples"])
    assert m_gpu == m_cpu
    _on_cpu(gpu)
    assert sorted(imp_gpu) == sorted(imp_cpu) and all(torch.equal(imp_gpu[k], imp_cpu[k]) for k in imp_cpu)  # towers: CPU both
    assert sorted(gpu.tensors) == sorted(cpu.tensors)
    methods = {qt.info.get("method", "rtn") for qt in gpu.tensors.values()}
    assert {"gptq"} <= methods and any(qt.scheme.method == "awq" for qt in gpu.tensors.values())
    assert sorted(gpu.rescaled) == sorted(cpu.rescaled) and gpu.rescaled
    # Layer 0's first stage (q/k/v) reads the same captured inputs on both devices: statistics
    # agree to rounding and GPTQ codes to rounding ties (H200: 99.6-99.9% equal).
    first = [n for n in cpu.tensors if any(f".layers.0.self_attn.{p}_proj." in n for p in "qkv")]
    assert len(first) == 3
    for name in first:
        torch.testing.assert_close(gpu.importance[name], cpu.importance[name], rtol=1e-4, atol=1e-7)
        assert float((gpu.tensors[name].codes == cpu.tensors[name].codes).float().mean()) > 0.98, name
    # Every later stage reads inputs through the codes before it, and GPTQ amplifies a flipped
    # tie: the CPU alone, at 1 and at 2 threads, keeps 83-90% of layer 0's o/gate/up codes and
    # 74-78% of layer 1's attention codes, and its fp8 KV scales move by 6% (measured on this
    # model). So the later codes and KV scales are checked against references built from the
    # GPU's own codes (tests/test_sequential.py, device=cuda); here, quality per layer.
    for i, rep in cpu.report.items():
        assert gpu.report[i]["rel_error"] == pytest.approx(rep["rel_error"], rel=0.25, abs=1e-3), i
        assert gpu.report[i]["methods"] == rep["methods"]
    assert sorted(gpu.kv_scales) == sorted(cpu.kv_scales) and all(k > 0 and v > 0 for k, v in gpu.kv_scales.values())


@gpu
def test_device_memory_holds_one_layer(tiny_random):
    """Streamed on the GPU: once the KV producers have stored their caches, the memory left
    allocated after each layer is released is the same for every later layer (nothing of a
    layer stays on the device), and nothing is left after the run."""
    from quantize.model import Checkpoint
    from quantize.sequential import LINEARS, quantize_text_decoder, text_linear_name
    from quantize.streamed_model import StreamedModel

    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(5, 4000, (1, 96), generator=g)} for _ in range(3)]
    dev = torch.device("cuda", torch.cuda.current_device())
    # cuBLAS keeps its workspace in torch's allocator from the first matmul on: start after it.
    a = torch.eye(64, device=dev) * 2
    torch.cholesky_inverse(torch.linalg.cholesky_ex(a @ a)[0])
    del a
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    streamed = StreamedModel(Checkpoint(Path(tiny_random)), [b["input_ids"] for b in batches])
    model = streamed.model
    layers = model.model.language_model.layers
    schemes = {}
    for i, layer in enumerate(layers):
        for m in LINEARS:
            try:
                layer.get_submodule(m)
            except AttributeError:
                continue
            schemes[text_linear_name(i, m)] = QuantScheme(type="int4", method="gptq", act_order=True)
    after: list[int] = []
    release = streamed.release_layer

    def recording_release(i):
        release(i)
        torch.cuda.synchronize(dev)
        after.append(torch.cuda.memory_allocated(dev))

    streamed.release_layer = recording_release
    result = quantize_text_decoder(model, schemes, batches, device="cuda", kv_fp8=True, progress=False, streamed=streamed)
    _on_cpu(result)
    cfg = model.model.language_model.config
    first_consumer = cfg.num_hidden_layers - cfg.num_kv_shared_layers
    assert len(after) == len(layers) and 0 < first_consumer < len(layers) - 1
    assert len(set(after[first_consumer:])) == 1, after
    assert all(p.is_meta or p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    del result
    torch.cuda.synchronize(dev)
    assert torch.cuda.memory_allocated(dev) == base


def _layer_recorder(model, seen: list):
    layer0 = model.model.language_model.layers[0]

    def hook(_m, args):
        seen.append({
            "device": str(args[0].device),
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "bf16_reduced_reduction": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "precision": torch.get_float32_matmul_precision(),
        })
    return layer0.register_forward_pre_hook(hook)


@gpu
def test_cuda_index_and_exact_fp32_flags_are_scoped_to_the_run(tiny_random):
    from transformers import Gemma3nForConditionalGeneration

    from quantize.sequential import SequentialError, quantize_text_decoder, text_linear_name

    model = Gemma3nForConditionalGeneration.from_pretrained(tiny_random, dtype=torch.float32).eval()
    schemes = {text_linear_name(0, "mlp.down_proj"): PRESET_SCHEMES["int4_gptq"]}
    batches = [{"input_ids": torch.arange(10, 74).reshape(1, -1)}]
    n = torch.cuda.device_count()
    with pytest.raises(SequentialError, match=rf"device cuda:{n}: torch sees {n} CUDA device\(s\), valid: cuda:0 \.\. cuda:{n - 1}"):
        quantize_text_decoder(model, schemes, batches, device=f"cuda:{n}", progress=False)
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.set_float32_matmul_precision("high")  # what a caller may have set: TF32 matmuls
    torch.backends.cudnn.benchmark = True
    seen: list = []
    hook = _layer_recorder(model, seen)
    try:
        res = quantize_text_decoder(model, schemes, batches, device=f"cuda:{n - 1}", progress=False)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction is True  # torch's default, restored
        assert torch.backends.cudnn.benchmark is True
    finally:
        hook.remove()
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]
    assert seen and all(s == {"device": f"cuda:{n - 1}", "matmul_tf32": False, "bf16_reduced_reduction": False, "cudnn_tf32": False,
                              "cudnn_deterministic": True, "cudnn_benchmark": False, "precision": "highest"}
                        for s in seen[1:]), seen  # seen[0]: the capture's own forward, on the CPU
    assert model.model.language_model.layers[0].mlp.down_proj.weight.device.type == "cpu"
    _on_cpu(res)


DETERMINISM_CHILD = r"""
import hashlib, json, sys, torch
torch.use_deterministic_algorithms(True)  # a nondeterministic CUDA kernel raises
from transformers import Gemma3nForConditionalGeneration
from quantize.schemes import PRESET_SCHEMES, QuantScheme
from quantize.sequential import LINEARS, quantize_text_decoder, text_linear_name

def digest(folder):
    model = Gemma3nForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    schemes = {}
    for i, layer in enumerate(model.model.language_model.layers[:6]):
        for m in LINEARS:
            try:
                layer.get_submodule(m)
            except AttributeError:
                continue
            schemes[text_linear_name(i, m)] = (PRESET_SCHEMES["int4_awq"] if i == 2 and m.startswith("mlp")
                                               else QuantScheme(type="int4", method="gptq", act_order=True))
    g = torch.Generator().manual_seed(7)
    batches = [{"input_ids": torch.randint(5, 4000, (1, 80), generator=g)} for _ in range(2)]
    res = quantize_text_decoder(model, schemes, batches, device="cuda", kv_fp8=True, progress=False)
    h = hashlib.sha256()
    for n in sorted(res.tensors):
        h.update(res.tensors[n].codes.numpy().tobytes()); h.update(res.tensors[n].scales.numpy().tobytes())
    for n in sorted(res.updated):
        h.update(res.updated[n].numpy().tobytes())
    h.update(json.dumps(sorted(res.kv_scales.items())).encode())
    return h.hexdigest()

print(json.dumps([digest(sys.argv[1]), digest(sys.argv[1])]))
"""


@gpu
def test_engine_runs_under_torch_deterministic_algorithms_and_repeats_bit_for_bit(tiny_random):
    """In a fresh process with CUBLAS_WORKSPACE_CONFIG set before CUDA starts (what
    use_deterministic_algorithms needs for cuBLAS): GPTQ act-order, AWQ and KV scales on the GPU
    use no kernel torch knows to be nondeterministic, and two runs give the same bytes."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keep any packages put there
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONPATH": path}
    p = subprocess.run([sys.executable, "-c", DETERMINISM_CHILD, str(tiny_random)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    first, second = json.loads(p.stdout.strip().splitlines()[-1])
    assert first == second and len(first) == len(hashlib.sha256().hexdigest())


@gpu
def test_eval_backend_runs_on_the_cuda_index_asked_for(tiny_random):
    """eval's transformers backend on cuda:N: the model and its logits live on GPU N (logits
    as the CPU computes them), and cuda:<count> is refused naming the valid indices."""
    import numpy as np

    from eval.backends.hf import TransformersBackend
    from eval.errors import EvalError

    n = torch.cuda.device_count()
    with pytest.raises(EvalError, match=rf"--device cuda:{n}: torch sees {n} CUDA device\(s\)"):
        TransformersBackend(tiny_random, device=f"cuda:{n}")
    tokens = [2] + list(range(300, 340))
    cpu = TransformersBackend(tiny_random, device="cpu")
    want = cpu.logits(tokens)
    cpu.close()
    gpu_backend = TransformersBackend(tiny_random, device=f"cuda:{n - 1}")
    try:
        assert {p.device for p in gpu_backend.model.parameters()} == {torch.device("cuda", n - 1)}
        got = gpu_backend.logits(tokens)
    finally:
        gpu_backend.close()
    # fp32 on both, sums in other orders; the gap grows along the positions (H200: 1e-5 of the
    # largest logit at the first, 1.3e-3 at the 28th), so compare distributions as
    # tests/test_eval_gpu.py does.
    lp_w, lp_g = torch.log_softmax(torch.from_numpy(want), -1), torch.log_softmax(torch.from_numpy(got), -1)
    assert float(torch.nn.functional.kl_div(lp_g, lp_w, log_target=True, reduction="none").sum(-1).max()) < 1e-3
    assert np.abs(got - want).max() <= 5e-3 * np.abs(want).max()
