"""The recipe's eval: section: python -m quantize run evaluates what it wrote, in the same run.

Reference: python -m eval run on the finished artifacts (the eval package's own command line,
run afterwards on the renamed output folder) must give the same perplexity and KL. --no-eval
writes no evaluation and the same artifact bytes; a failing evaluation keeps the artifacts,
records the failure in the manifest and exits 1."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from quantize.cli import main as quantize_main

pytestmark = pytest.mark.llamacpp

SEQ, N = 64, 2


def _recipe(tmp: Path, model: Path, name: str, eval_spec: dict | None) -> Path:
    data = {
        "version": 1, "name": "evalrun", "model": str(model), "output": str(tmp / "unused"),
        # RTN everywhere: no calibration, so the run is quick
        "towers": {"text": "int8", "token_embeddings": "int8", "per_layer_embeddings": "int8",
                   "per_layer_projections": "keep", "altup_laurel": "keep", "vision": "keep", "audio": "keep",
                   "embedders": "keep"},
        "exports": {"gguf": {"mix": "auto", "mmproj": False}, "safetensors": {"format": "compressed-tensors"}},
    }
    if eval_spec is not None:
        data["eval"] = eval_spec
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def evaluated(tiny_trained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run_eval")
    recipe = _recipe(tmp, Path(tiny_trained), "with-eval", {"n_windows": N, "seq_len": SEQ})
    out = tmp / "out"
    assert quantize_main(["run", str(recipe), "--out", str(out)]) == 0
    return {"tmp": tmp, "recipe": recipe, "out": out, "manifest": json.loads((out / "manifest.json").read_text())}


def test_run_writes_results_and_report_the_manifest_points_to(evaluated):
    out, ev = evaluated["out"], evaluated["manifest"]["eval"]
    assert set(ev["results"]) == {"reference", "safetensors", "evalrun-auto.gguf"}
    for rel in [*ev["results"].values(), *ev["report"]]:
        assert (out / rel).is_file() and not Path(rel).is_absolute()
    assert ev["report"] == ["eval/report.md", "eval/report.html"]
    assert ev["spec"]["n_windows"] == N and ev["spec"]["seq_len"] == SEQ
    for artifact, rel in ev["results"].items():
        r = json.loads((out / rel).read_text())
        if artifact != "reference":
            # recorded relative to eval/, so true after the rename (and wherever the folder moves)
            assert r["artifact"]["path"] == f"../{artifact}"
            assert (out / "eval" / r["artifact"]["path"]).exists()
        assert r["settings"]["seq_len"] == SEQ and r["settings"]["n_windows"] == N
    assert not list(out.parent.glob(".out.partial-*"))
    report = (out / "eval" / "report.md").read_text()
    assert "evalrun-auto" in report and "safetensors" in report


def test_results_equal_python_m_eval_run_on_the_artifacts(evaluated, tiny_trained):
    from eval.cli import main as eval_main

    out = evaluated["out"]
    indep = evaluated["tmp"] / "independent"
    gguf, st = out / "evalrun-auto.gguf", out / "safetensors"
    assert eval_main(["run", str(gguf), str(st), "--reference", str(tiny_trained), "--out", str(indep),
                      "--seq-len", str(SEQ), "--n-windows", str(N)]) == 0
    theirs = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in indep.glob("*.json")}
    ours = {k: json.loads((out / v).read_text()) for k, v in evaluated["manifest"]["eval"]["results"].items()}
    for key, name in (("evalrun-auto.gguf", "evalrun-auto"), ("safetensors", "safetensors")):
        q, t = ours[key]["quality"], theirs[name]["quality"]
        assert q["ppl"] == pytest.approx(t["ppl"], rel=1e-6)
        assert q["kl"]["mean"] == pytest.approx(t["kl"]["mean"], rel=1e-5, abs=1e-9)
        assert q["kl"]["mean"] > 0  # int8 is not the reference
        assert ours[key]["artifact"]["sha256"] == theirs[name]["artifact"]["sha256"]
    assert ours["reference"]["quality"]["kl"]["mean"] == 0.0


def test_no_eval_writes_none_and_the_same_artifacts(evaluated):
    out2 = evaluated["tmp"] / "out-no-eval"
    assert quantize_main(["run", str(evaluated["recipe"]), "--out", str(out2), "--no-eval"]) == 0
    assert not (out2 / "eval").exists()
    manifest = json.loads((out2 / "manifest.json").read_text())
    assert manifest["eval"] is None
    assert _sha(out2 / "evalrun-auto.gguf") == _sha(evaluated["out"] / "evalrun-auto.gguf")


def test_failed_eval_keeps_the_artifacts_and_exits_1(tiny_trained, tmp_path, capsys, monkeypatch):
    """llama.cpp refusing the GGUF at evaluation time (injected here: the tiny model's GGUF loads)."""
    from eval.backends import llamacpp
    from eval.errors import EvalError

    def refuse(self, path, **kwargs):
        raise EvalError(f"{path}: llama.cpp could not load this GGUF (injected)")

    monkeypatch.setattr(llamacpp.LlamaCppBackend, "__init__", refuse)
    recipe = _recipe(tmp_path, Path(tiny_trained), "bad-eval", {"n_windows": N, "seq_len": SEQ})
    out = tmp_path / "out"
    assert quantize_main(["run", str(recipe), "--out", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "could not load this GGUF" in err[0]
    # the message names the file where the user finds it, not the temporary folder
    assert str(out / "evalrun-auto.gguf") in err[0] and ".partial" not in err[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "could not load this GGUF" in manifest["eval"]["error"]
    assert (out / "evalrun-auto.gguf").is_file() and (out / "safetensors" / "config.json").is_file()
    assert not (out / "eval").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("case", ["missing", "short"])
def test_bad_eval_text_is_refused_before_anything_is_written(tiny_trained, tmp_path, capsys, case):
    text = tmp_path / f"{case}.txt"
    if case == "short":
        text.write_text("far too short to fill two windows", encoding="utf-8")
    recipe = _recipe(tmp_path, Path(tiny_trained), case,
                     {"n_windows": N, "seq_len": SEQ, "text": {"source": "files", "path": str(text)}})
    out = tmp_path / "out"
    assert quantize_main(["run", str(recipe), "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"{case}.txt" in err[0]
    assert ("eval.text.path" if case == "missing" else "too few tokens") in err[0]
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("switch", ["kl", "perplexity"])
def test_each_quality_key_does_what_it_says(evaluated, tiny_trained, tmp_path, switch):
    """kl: false measures no KL (no forward of the source model: no KL base), perplexity: false
    no perplexity (and no source-model baseline); what is measured equals the full run's."""
    recipe = _recipe(tmp_path, Path(tiny_trained), switch, {"n_windows": N, "seq_len": SEQ, switch: False})
    out = tmp_path / "out"
    assert quantize_main(["run", str(recipe), "--out", str(out)]) == 0
    ev = json.loads((out / "manifest.json").read_text())["eval"]
    full = {k: json.loads((evaluated["out"] / v).read_text())["quality"]
            for k, v in evaluated["manifest"]["eval"]["results"].items()}
    assert ("reference" in ev["results"]) == (switch == "kl")
    assert bool(list((out / "eval").glob("kl-base-*.npz"))) == (switch == "perplexity")
    for key in ("evalrun-auto.gguf", "safetensors"):
        q = json.loads((out / ev["results"][key]).read_text())["quality"]
        if switch == "kl":
            assert "kl" not in q and q["ppl"] == pytest.approx(full[key]["ppl"], rel=1e-6)
        else:
            assert "ppl" not in q and q["kl"]["mean"] == pytest.approx(full[key]["kl"]["mean"], rel=1e-5, abs=1e-9)
    table = (out / "eval" / "report.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| evalrun-auto |"))
    assert "| - |" in row


def test_latency_needs_text_for_its_longest_prompt():
    # eval times prompts of 64 and 256 tokens cut from the windows' text: 1 x (64 - 1) = 63 tokens
    # cannot hold them, 2 x (129 - 1) = 256 can; refused before any work, naming the keys
    from quantize.errors import RecipeError
    from quantize.evaluation import check_eval
    from quantize.recipe import parse_recipe

    def recipe(n, s):
        return parse_recipe({"model": "m", "output": "o", "exports": {"safetensors": {}},
                             "eval": {"latency": True, "n_windows": n, "seq_len": s}})

    with pytest.raises(RecipeError, match=r"prompts of 256 tokens.*= 63 tokens.*eval.n_windows"):
        check_eval(recipe(1, 64))
    check_eval(recipe(2, 129))
