"""The import rules the packages' docstrings state, checked in fresh interpreters."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _loaded_after(imports: str) -> set[str]:
    code = f"import sys; {imports}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return {m.split(".")[0] for m in out.split()}


def test_quantize_core_does_not_import_eval():
    core = ("import quantize.pipeline, quantize.sequential, quantize.streamed_model, quantize.plan, "
            "quantize.recipe, quantize.formats.gguf, quantize.formats.safetensors, quantize.methods.gptq")
    assert "eval" not in _loaded_after(core)


def test_parsing_a_recipe_with_device_and_eval_does_not_import_eval():
    # validators run code: a recipe's device and eval sections are checked without eval
    parse = ("from quantize.recipe import parse_recipe; parse_recipe({'model': 'm', 'output': 'o', 'device': 'cuda:1', "
             "'eval': {'latency': True, 'n_windows': 2, 'seq_len': 64}})")
    assert "eval" not in _loaded_after(parse)


def test_eval_does_not_import_quantize():
    assert "quantize" not in _loaded_after("import eval.run, eval.report, eval.cli, eval.backends.hf, eval.backends.llamacpp")


def test_calibrate_imports_nothing_of_ours():
    assert not {"quantize", "eval"} & _loaded_after("import calibrate, calibrate.text, calibrate.multimodal")
