"""The transformers internals the calibration engine relies on (quantize.compat).

The first test fails loudly when an upgrade of transformers moves any of them: that is its job.
"""
from __future__ import annotations

import inspect
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from quantize.compat import TESTED_RANGE, check_transformers, missing_internals
from quantize.errors import QuantizeError

ROOT = Path(__file__).resolve().parents[1]


def test_installed_transformers_has_every_internal_the_engine_uses():
    assert missing_internals() == []
    check_transformers()
    # independent of compat's own list: what the engine really calls
    from transformers.cache_utils import KVSharingDict
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextDecoderLayer

    params = inspect.signature(Gemma3nTextDecoderLayer.forward).parameters
    assert {"shared_kv_states", "per_layer_input", "position_embeddings"} <= set(params)
    assert callable(KVSharingDict)


def test_the_declared_range_is_the_checked_one():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"transformers{TESTED_RANGE}" in deps


@pytest.mark.parametrize("version", ["4.57.1", "5.23.0", "6.0.0", "6.1.0.dev0"])
def test_versions_outside_the_range_are_refused_in_one_line(version):
    with pytest.raises(QuantizeError) as e:
        check_transformers(version)
    msg = str(e.value)
    assert "\n" not in msg and version in msg and TESTED_RANGE in msg


def test_a_missing_internal_is_named(monkeypatch):
    import transformers.cache_utils as cu

    monkeypatch.delattr(cu, "KVSharingDict")
    with pytest.raises(QuantizeError, match="KVSharingDict"):
        check_transformers("5.24.0")


def test_cli_refuses_a_calibrated_run_on_a_wrong_transformers(tmp_path, tiny_random):
    # A transformers outside the range, in a fresh interpreter: the CLI must stop with exit 2 and
    # one line before loading any weight, and leave no output.
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "out"
    recipe.write_text(f"model: {tiny_random}\noutput: {out}\ntowers: {{text: int4_gptq}}\n"
                      "calibration: {text: {source: embedded, n_samples: 1, seq_len: 32}}\n"
                      "exports: {safetensors: {format: compressed-tensors}}\n")
    # (transformers.__version__ cannot be faked: importing its submodules restores it; move the
    # tested range instead, in the child only)
    code = ("import sys, transformers, quantize.compat as c; c.TRANSFORMERS_MIN = (99, 0); "
            f"from quantize.cli import main; sys.exit(main(['run', {str(recipe)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    import transformers

    assert len(err) == 1 and transformers.__version__ in err[0]
    assert not out.exists()
