"""Command line: exit codes, one-line errors, no partial output, dry-run plan, inspect."""
import subprocess
import sys
from pathlib import Path

import pytest


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "quantize", *args], capture_output=True, text=True, cwd=cwd)


def _recipe(tmp_path, body: str):
    p = tmp_path / "r.yaml"
    p.write_text(body)
    return p


@pytest.mark.parametrize(
    "body, needle",
    [
        ("model: m\noutput: OUT\ntowers: {textt: int4}\n", "towers.textt"),
        ("model: m\noutput: OUT\nseed: abc\n", "seed"),
        ("model: /nonexistent/model\noutput: OUT\n", "/nonexistent/model"),
        ("model: MODEL\noutput: OUT\ncalibration: {text: {source: files, path: /nope/data.txt}}\n", "calibration.text.path"),
        ("model: [unclosed\n", "not valid YAML"),
        ("model: MODEL\noutput: OUT\nexports: {gguf: {mmproj: true}}\n", "text hidden_size 256 != vision hidden_size 2048"),
    ],
    ids=["unknown-key", "wrong-type", "missing-model", "missing-data-file", "bad-yaml", "mmproj-mtmd-cannot-run"],
)
def test_bad_input_one_line_exit_2_no_output(tmp_path, tiny_random, body, needle):
    out = tmp_path / "out"
    r = _run("run", str(_recipe(tmp_path, body.replace("OUT", str(out)).replace("MODEL", str(tiny_random)))))
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("body, flags, needle", [
    ("model: MODEL\noutput: OUT\n", ["--json"], "--json goes with --dry-run"),
    ("model: MODEL\noutput: OUT\nexports: {safetensors: {}}\n", ["--force"], "--force"),
    ("model: MODEL\noutput: OUT\ntowers: {vision: int4_gptq}\n", [], "towers.vision asks for method 'gptq'"),
    ("model: MODEL\noutput: OUT\ncalibration: {text: {source: embedded, path: my.txt}}\n", [], "does not read 'path'"),
], ids=["json-without-dry-run", "force-without-gguf", "gptq-on-vision", "embedded-with-path"])
def test_a_flag_or_key_that_would_be_ignored_is_refused(tmp_path, tiny_random, body, flags, needle):
    """Accepted and ignored is worse than refused: one line, exit 2, nothing written."""
    out = tmp_path / "out"
    r = _run("run", str(_recipe(tmp_path, body.replace("OUT", str(out)).replace("MODEL", str(tiny_random)))), *flags)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_missing_recipe_file(tmp_path):
    r = _run("run", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "nope.yaml" in r.stderr


def test_pickle_checkpoint_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    r = _run("inspect", str(tmp_path / "m"))
    assert r.returncode == 2 and "--allow-pickle" in r.stderr


def test_dry_run_prints_plan_without_output(tmp_path, tiny_random):
    out = tmp_path / "out"
    r = _run("run", "recipes/demo.yaml", "--model", str(tiny_random), "--out", str(out), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "per_layer_embeddings" in r.stdout and "int4-g32-gptq" in r.stdout
    assert "layer 18 -> layers 20, 21, 22, 23" in r.stdout
    assert "predicted GGUF text model (demo-auto.gguf):" in r.stdout and "IQ1_S (placeholders)" in r.stdout
    assert "text decoder calibration forward: float32 (set in the recipe)" in r.stdout
    assert not out.exists()
    # compute_dtype: auto on a float32-stored decoder: float32, and why
    auto = tmp_path / "auto.yaml"
    auto.write_text(Path("recipes/demo.yaml").read_text() + "\ncompute_dtype: auto\n")
    r = _run("run", str(auto), "--model", str(tiny_random), "--out", str(out), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert ("text decoder calibration forward: float32 (auto: float32, since bfloat16 needs the text decoder "
            "stored in bfloat16 (GPTQ would quantize rounded weights))") in r.stdout
    assert not out.exists()


def test_inspect(tiny_random):
    r = _run("inspect", str(tiny_random))
    assert r.returncode == 0, r.stderr
    for needle in ("per-layer embeddings", "AltUp", "LAuReL", "vision tower", "audio tower",
                   "multimodal embedders", "layer 19 -> layers 24", "layers.20.self_attn.k_proj.weight"):
        assert needle in r.stdout, needle


def test_pickle_checkpoint_converted_only_with_flag(tmp_path, tiny_random, monkeypatch):
    """--allow-pickle: a .bin checkpoint is loaded once and read as safetensors; the converted
    folder holds the same tensors transformers loads from the pickle."""
    import torch
    from safetensors.torch import load_file

    from quantize.model import Checkpoint, resolve_model

    monkeypatch.setenv("GEMMA3N_QUANT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "pkl"
    src.mkdir()
    (src / "config.json").write_text((tiny_random / "config.json").read_text())
    state = load_file(str(tiny_random / "model.safetensors"))
    torch.save(state, src / "pytorch_model.bin")
    r = _run("inspect", str(src))
    assert r.returncode == 2 and "--allow-pickle" in r.stderr
    folder = resolve_model(src, allow_pickle=True)
    ckpt = Checkpoint(folder)
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    assert torch.equal(ckpt.get(name), state[name])
