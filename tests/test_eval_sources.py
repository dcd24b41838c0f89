"""python -m eval run on the user's own text (--text, like llama-perplexity -f), results named
per artifact path, a hub id as --reference (read from the hub cache offline), --device cuda:N.

References: perplexity by hand (the tokenizer on the file, windows cut here, transformers'
forward and torch's cross-entropy); calibrate's own held-out windows for the default text;
hashlib on the file's bytes; the hub cache layout huggingface_hub itself reads."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from eval.cli import main
from eval.errors import EvalError
from eval.kl import KLBase

# Plain English, unlike the Python sources the tiny model was trained on: a text of the user's own.
TEXT = (
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "Farmers moved their animals to the hills, while the children watched boats drift past the old mill. "
    "Nobody in the village could remember a flood like it, although the oldest stories spoke of one. "
    "When the rain finally stopped, the sun came out over a landscape that looked like a wide, quiet lake. "
    "It took three weeks for the water to return to the river, leaving mud, broken fences and a great deal of work. "
) * 3

SEQ, N = 64, 2


def _run(argv, capsys):
    rc = main(["run", *argv, "--seq-len", str(SEQ), "--n-windows", str(N), "--threads", "1"])
    return rc, capsys.readouterr()


def _results(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_default_text_is_calibrates_held_out_split(tiny_trained):
    """The embedded default gives exactly the windows calibrate.heldout_text gives (and what
    earlier versions of eval scored)."""
    from transformers import AutoTokenizer

    from calibrate import heldout_text
    from eval.heldout import TextSource, load_text, text_windows

    tok = AutoTokenizer.from_pretrained(str(tiny_trained))
    texts, meta = load_text(TextSource())
    got = text_windows(tok, texts, 3, 48, "test")
    want = torch.cat(heldout_text(tok, 3, 48)).numpy()
    assert (got == want).all()
    assert meta["source"] == "embedded" and meta["split"] == "eval"


def test_text_file_perplexity_by_hand_and_its_own_kl_base(tiny_trained, tmp_path, capsys):
    from transformers import AutoTokenizer, Gemma3nForConditionalGeneration

    ref = Path(tiny_trained)
    text_file = tmp_path / "story.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "res"
    rc, cap = _run([str(ref), "--reference", str(ref), "--text", str(text_file), "--out", str(out)], capsys)
    assert rc == 0, cap.err
    (r,) = _results(out)
    assert r["text"]["source"] == "files" and r["text"]["path"] == str(text_file)
    assert r["text"]["files"] == [{"path": str(text_file), "sha256": hashlib.sha256(text_file.read_bytes()).hexdigest()}]
    assert r["text"]["text_sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest() == r["settings"]["text_sha256"]

    # by hand: the file's tokens, <bos> + 63 consecutive tokens per window, second half scored
    tok = AutoTokenizer.from_pretrained(str(ref))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    body = SEQ - 1
    windows = [[tok.bos_token_id] + ids[k * body:(k + 1) * body] for k in range(N)]
    model = Gemma3nForConditionalGeneration.from_pretrained(str(ref), dtype=torch.float32).eval()
    first = SEQ // 2
    losses = []
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([w])
            logits = model(input_ids=x).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits[first:-1].double(), x[0, first + 1:], reduction="none"))
    want = float(torch.exp(torch.cat(losses).mean()))
    assert r["quality"]["ppl"] == pytest.approx(want, rel=1e-5)
    assert r["quality"]["kl"]["mean"] == 0.0  # the reference against its own base

    # The default text in the same folder gets its own KL base, never the file's.
    rc, cap = _run([str(ref), "--reference", str(ref), "--out", str(out)], capsys)
    assert rc == 0, cap.err
    bases = sorted(out.glob("kl-base-*.npz"))
    assert len(bases) == 2
    (r2,) = [x for x in _results(out) if x["text"]["source"] == "embedded"]
    assert r2["quality"]["ppl"] != r["quality"]["ppl"]
    # Naming the file's base for the default text is refused: it was made on another text.
    file_base = next(b for b in bases if KLBase.load(b).meta["text"]["source"] == "files")
    rc, cap = _run([str(ref), "--reference", str(ref), "--out", str(out), "--kl-base", str(file_base)], capsys)
    assert rc == 2 and "made on another text" in cap.err and len(cap.err.strip().splitlines()) == 1


def test_text_errors_are_one_line(tiny_trained, tmp_path, capsys):
    ref = str(tiny_trained)
    rc, cap = _run([ref, "--reference", ref, "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "missing.txt" in cap.err and len(cap.err.strip().splitlines()) == 1
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    rc, cap = _run([ref, "--reference", ref, "--text", str(short), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "too few tokens" in cap.err and len(cap.err.strip().splitlines()) == 1
    rc, cap = _run([ref, "--reference", ref, "--split", "test", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "--dataset" in cap.err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.json"))


def _fake_hub_cache(root: Path, repo: str, model: Path) -> Path:
    """The layout huggingface_hub writes: models--OWNER--NAME/{refs/main, snapshots/COMMIT/...}."""
    commit = "0" * 40
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for f in model.iterdir():
        if f.is_file():
            (snap / f.name).symlink_to(f)
    return snap


def test_same_named_artifacts_keep_their_results_and_hub_reference(tiny_trained, tmp_path, monkeypatch, capsys):
    """Two folders both named 'model' (in a/ and b/) get a results file each; the reference is
    a hub id read from the (here: fake) hub cache."""
    from huggingface_hub import constants

    ref = Path(tiny_trained)
    cache = tmp_path / "hub"
    snap = _fake_hub_cache(cache, "tiny/gemma-3n", ref)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    folders = []
    for d in ("a", "b"):
        f = tmp_path / d / "model"
        f.mkdir(parents=True)
        for src in ref.iterdir():
            if src.is_file():
                (f / src.name).symlink_to(src)
        folders.append(f)
    out = tmp_path / "res"
    rc, cap = _run([*map(str, folders), "--reference", "tiny/gemma-3n", "--out", str(out)], capsys)
    assert rc == 0, cap.err
    results = _results(out)
    assert len(results) == 2
    assert sorted(r["artifact"]["path"] for r in results) == sorted(str(f.resolve()) for f in folders)
    assert all(r["name"] == "model" for r in results)
    assert {r["reference"]["path"] for r in results} == {str(snap)}
    assert all(r["quality"]["kl"]["mean"] == 0.0 for r in results)  # the same weights as the reference

    rc, cap = _run([str(folders[0]), "--reference", "nobody/not-cached", "--out", str(out)], capsys)
    assert rc == 2 and "nobody/not-cached" in cap.err and "hub cache" in cap.err
    assert len(cap.err.strip().splitlines()) == 1


def test_result_names_differ_by_artifact_path_only(tmp_path):
    from eval.results import SCHEMA_VERSION, load_results, write_result

    def result(path):
        return {"schema_version": SCHEMA_VERSION, "name": "model", "backend": "transformers",
                "artifact": {"path": path, "kind": "safetensors", "size_bytes": 1, "sha256": "0" * 64},
                "device": {"kind": "cpu", "label": "cpu"}, "quality": {"ppl": 1.0}}

    a = write_result(result("/x/a/model"), tmp_path)
    b = write_result(result("/x/b/model"), tmp_path)
    assert a != b and a.name.startswith("model-") and b.name.startswith("model-")
    assert write_result(result("/x/a/model"), tmp_path) == a  # re-evaluating one path replaces its results
    assert sorted(r["artifact"]["path"] for r in load_results([tmp_path])) == ["/x/a/model", "/x/b/model"]


def test_device_cuda_index_parsing(tiny_random, capsys):
    from eval.backends import parse_device

    assert parse_device("cpu") == ("cpu", None)
    assert parse_device("cuda") == ("cuda", None)
    assert parse_device("cuda:3") == ("cuda", 3)
    for bad in ("gpu", "cpu:0", "cuda:x", "cuda:"):
        with pytest.raises(EvalError, match="valid: cpu, cuda or cuda:N"):
            parse_device(bad)
    with pytest.raises(SystemExit) as e:
        main(["run", str(tiny_random), "--reference", str(tiny_random), "--out", "x", "--device", "gpu"])
    assert e.value.code == 2 and "cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        from eval.backends.hf import TransformersBackend

        with pytest.raises(EvalError, match="--device cuda:1: no CUDA device"):
            TransformersBackend(tiny_random, device="cuda:1")


@pytest.mark.gpu
def test_cuda_index_selects_that_gpu(tiny_random):
    from eval.backends.hf import TransformersBackend

    n = torch.cuda.device_count()
    be = TransformersBackend(tiny_random, device=f"cuda:{n - 1}")
    try:
        assert next(be.model.parameters()).device == torch.device("cuda", n - 1)
        tokens = [2] + list(range(300, 331))
        got = be.logits(tokens)
    finally:
        be.close()
    cpu = TransformersBackend(tiny_random, device="cpu")
    want = cpu.logits(tokens)
    cpu.close()
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.95
    with pytest.raises(EvalError, match=f"valid: cuda:0 .. cuda:{n - 1}"):
        TransformersBackend(tiny_random, device=f"cuda:{n}")


def test_a_text_source_key_that_would_be_ignored_is_refused(tmp_path):
    from eval.heldout import TextSource

    with pytest.raises(EvalError, match="'split'"):
        TextSource("files", path=str(tmp_path / "t.txt"), split="test")  # a file has no splits
    with pytest.raises(EvalError, match="'column'"):
        TextSource(column="body")  # the embedded text has no columns
    assert TextSource("hub", dataset="wikitext", name="wikitext-2-raw-v1", split="test", column="text").split == "test"


def test_timing_flags_without_latency_are_refused(tmp_path, capsys):
    """--repeats and the other timing flags would be ignored without --latency: one line, exit 2."""
    rc = main(["run", str(tmp_path / "a.gguf"), "--reference", str(tmp_path), "--out", str(tmp_path / "out"),
               "--repeats", "5", "--warmup", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--repeats, --warmup go with --latency" in err
    assert not (tmp_path / "out").exists()
