"""Data safety (issue 12): a run never deletes what it did not write, cleans up after kills and
signals, refuses bad checkpoints and full disks with one line, and writes the same bytes
wherever its inputs and outputs live.

The end-to-end cases drive ``python -m quantize run`` in real subprocesses (signals, exit
codes, the file system after the fact); the references are the file system itself, sha256
sums computed here, and gguf-py's reader for the GGUF metadata."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

MARKER = ".gemma3n-quantize"  # quantize.atomic.MARKER, spelled out: the end-to-end tests need nothing new to import
# RTN only (no calibration), both formats: the quickest full run of the tiny model (~30 s).
RECIPE = """\
name: safety
model: {model}
output: {out}
towers: {{text: int4, token_embeddings: int8, per_layer_embeddings: int8, vision: keep, audio: keep}}
exports:
  gguf: {{mix: auto, mmproj: false}}
  safetensors: {{format: compressed-tensors}}
"""
ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _cli(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "quantize", *args], capture_output=True, text=True,
                          env=env or _env(), cwd=cwd)


def _recipe(tmp_path: Path, model, out) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE.format(model=model, out=out))
    return p


def _one_error(r) -> str:
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(out: Path) -> list[str]:
    """What a run left beside its output: partials, replaced outputs."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _assert_complete(out: Path) -> None:
    """Every artifact the manifest lists is there with the sum and size it records."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifacts"], manifest
    for a in manifest["artifacts"]:
        p = out / a["path"]
        assert p.stat().st_size == a["bytes"] and _sha(p) == a["sha256"], a["path"]


def _start(recipe: Path, out: Path) -> subprocess.Popen:
    """Start a run and return once it is writing into its partial folder."""
    # A shell that starts a job in the background (`pytest &`) leaves SIGINT ignored, children
    # inherit that, and Python then installs no KeyboardInterrupt handler: give the run the
    # default disposition, as an interactive terminal does.
    p = subprocess.Popen([sys.executable, "-m", "quantize", "run", str(recipe)], cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    partial = out.parent / f".{out.name}.partial-{p.pid}"
    deadline = time.monotonic() + 300
    while not partial.exists():
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never created its partial folder"
        time.sleep(0.05)
    time.sleep(1.0)  # into the writing
    assert p.poll() is None, "the run ended before it could be interrupted"
    return p


# ------------------------------------------------------------------ output folder, end to end


def test_foreign_folder_kept_and_killed_run_cleaned_up(tmp_path, tiny_random):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file\n")
    recipe = _recipe(tmp_path, tiny_random, out)

    # Refused before the model is even resolved: the model named here does not exist.
    line = _one_error(_cli("run", str(recipe), "--model", str(tmp_path / "no-such-model")))
    assert str(out) in line and "notes.txt" in line and "--overwrite" in line, line
    assert sorted(os.listdir(out)) == ["notes.txt"] and not _siblings(out)

    # --overwrite moves the user's folder aside, whole; nothing of it is deleted.
    r = _cli("run", str(recipe), "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    backup = tmp_path / "out.backup-1"
    assert sorted(os.listdir(backup)) == ["notes.txt"] and (backup / "notes.txt").read_text() == "the user's own file\n"
    _assert_complete(out)
    first = _tree(out)

    # A foreign folder that merely looks like a partial: never ours to remove.
    foreign = tmp_path / ".out.partial-123"
    foreign.mkdir()
    (foreign / "keep.bin").write_bytes(b"x")

    # SIGKILL mid-run: the partial (with our marker) stays, the earlier output is untouched.
    p = _start(recipe, out)
    p.kill()
    p.communicate()
    partial = tmp_path / f".out.partial-{p.pid}"
    marker = json.loads((partial / MARKER).read_text())
    assert marker["state"] == "partial" and marker["pid"] == p.pid
    assert _tree(out) == first

    # The next run removes the stale partial, keeps the foreign one, replaces its own output.
    r = _cli("run", str(recipe))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _siblings(out) == [".out.partial-123"] and (foreign / "keep.bin").read_bytes() == b"x"
    _assert_complete(out)
    assert _tree(out) == first  # same inputs, same bytes
    assert (backup / "notes.txt").read_text() == "the user's own file\n"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_exits_nonzero_and_leaves_nothing(tmp_path, tiny_random, sig, code):
    out = tmp_path / "out"
    p = _start(_recipe(tmp_path, tiny_random, out), out)
    p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    assert p.returncode == code, err[-3000:]
    assert not out.exists() and not _siblings(out)


# A stand-in for `python -m quantize` whose command runs a string exec when SIGINT arrives, as a
# dataclass definition or a lazy import can at any point of a real run.
_EXEC_MAIN = """
import os, signal, sys, threading
from quantize import cli

def busy(args):
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    exec("while True: pass", {})

cli.COMMANDS["inspect"] = busy
sys.exit(cli.main(["inspect", "unused"]))
"""


def test_sigint_during_a_string_exec_still_exits_130(tmp_path):
    """CPython flags a plain KeyboardInterrupt that ends a string exec/eval, even when caught,
    and under `python -m` then dies by SIGINT at exit (returncode -2) whatever code the program
    returned; the CLI's own SIGINT exception does not set that flag. Independent reference:
    plain Python run the same way without the CLI's handler dies by SIGINT (checked first)."""
    plain = tmp_path / "plain_main.py"
    plain.write_text('import os, signal, sys, threading\n'
                     'threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n'
                     'try:\n    exec("while True: pass", {})\nexcept KeyboardInterrupt:\n    sys.exit(130)\n')
    ours = tmp_path / "ours_main.py"
    ours.write_text(_EXEC_MAIN)
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))

    def run(module):
        return subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    assert run("plain_main").returncode == -signal.SIGINT  # the interpreter's behaviour this guards against
    r = run("ours_main")
    assert r.returncode == 130, (r.returncode, r.stderr[-2000:])
    assert r.stderr.strip().splitlines()[-1] == "interrupted"


# ------------------------------------------------------------------ output folder, the rules


def _earlier_output(out: Path) -> None:
    from quantize.atomic import atomic_folder

    with atomic_folder(out) as tmp:
        (tmp / "a.gguf").write_bytes(b"old")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text("{}")


def test_earlier_output_replaced_and_only_its_files_removed(tmp_path):
    from quantize import atomic
    from quantize.atomic import atomic_folder, check_output

    assert atomic.MARKER == MARKER
    out = tmp_path / "out"
    _earlier_output(out)
    assert check_output(out) == "replace"
    with atomic_folder(out) as tmp:
        (tmp / "c.gguf").write_bytes(b"new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "c.gguf"] and not _siblings(out)
    assert json.loads((out / MARKER).read_text())["files"] == ["c.gguf"]


def test_earlier_output_with_a_user_file_is_refused_and_kept(tmp_path):
    from quantize.atomic import OutputError, atomic_folder

    out = tmp_path / "out"
    _earlier_output(out)
    (out / "sub" / "mine.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"sub/mine.txt that gemma3n-quantize did not write.*--overwrite"):
        with atomic_folder(out) as tmp:
            (tmp / "c.gguf").write_bytes(b"new")
    assert (out / "a.gguf").read_bytes() == b"old" and (out / "sub" / "mine.txt").exists() and not _siblings(out)
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "c.gguf").write_bytes(b"new")
    assert (tmp_path / "out.backup-1" / "sub" / "mine.txt").read_text() == "mine"
    assert (tmp_path / "out.backup-1" / "a.gguf").read_bytes() == b"old"
    assert (out / "c.gguf").read_bytes() == b"new"


def test_failed_run_leaves_the_folders_it_made_and_nothing_else(tmp_path):
    from quantize.atomic import atomic_folder

    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "x").write_bytes(b"1")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_output_that_cannot_be_created_is_one_line(tmp_path):
    from quantize.atomic import OutputError, atomic_folder

    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=r"output: cannot create .*file/out"):
        with atomic_folder(tmp_path / "file" / "out"):
            pass
    assert os.listdir(tmp_path) == ["file"]


def test_outputs_that_would_move_the_users_folders_are_refused(tmp_path, monkeypatch):
    from quantize.atomic import OutputError, check_output
    from quantize.errors import QuantizeError

    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(OutputError, match="symbolic link"):
        check_output(link)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("")
    for folder in (tmp_path, tmp_path.parent):  # the current folder, and a folder holding it
        with pytest.raises(QuantizeError, match="current folder"):
            check_output(folder, overwrite=True)


def _partial(out: Path, pid: int, **marker) -> Path:
    p = out.parent / f".{out.name}.partial-{pid}"
    p.mkdir(parents=True)
    (p / "model.safetensors").write_bytes(b"half")
    if marker:
        fields = {"tool": "gemma3n-quantize", "state": "partial", "host": socket.gethostname(), "pid": pid,
                  "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip()}
        (p / MARKER).write_text(json.dumps({**fields, **marker}))
    return p


def test_only_provably_stale_partials_are_removed(tmp_path):
    from quantize.atomic import remove_stale

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = _partial(out, dead, state="partial")
        running = _partial(out, live.pid, state="partial")
        rebooted = _partial(out, os.getppid(), state="partial", boot_id="an-earlier-boot")  # a live PID
        elsewhere = _partial(out, dead + 100000, state="partial", host="another-machine")
        unmarked = _partial(out, dead + 200000)
        removed = remove_stale(out)
    finally:
        live.kill()
        live.wait()
    assert sorted(removed) == sorted([stale, rebooted])
    assert running.exists() and elsewhere.exists() and unmarked.exists()


# ------------------------------------------------------------------ bad checkpoints, full disk


def _copy(src: Path, dst: Path, skip=()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).symlink_to(f)
    return dst


def _with_text_config(src: Path, dst: Path, **changes) -> Path:
    _copy(src, dst, skip=("config.json",))
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"].update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _truncated(src, dst):
    _copy(src, dst, skip=("model.safetensors",))
    with open(src / "model.safetensors", "rb") as f:
        (dst / "model.safetensors").write_bytes(f.read(1 << 20))
    return dst


def _not_json(src, dst):
    _copy(src, dst, skip=("config.json",))
    (dst / "config.json").write_text('{"text_config": {')
    return dst


def _no_text_config(src, dst):
    _copy(src, dst, skip=("config.json",))
    cfg = json.loads((src / "config.json").read_text())
    del cfg["text_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _missing_shard(src, dst):
    from quantize.model import Checkpoint

    _copy(src, dst, skip=("model.safetensors",))
    (dst / "model-00001-of-00002.safetensors").symlink_to(src / "model.safetensors")
    names = list(Checkpoint(src).tensors)
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


BAD_CHECKPOINTS = {
    "truncated-shard": (_truncated, ["model.safetensors", "truncated"]),
    "config-not-json": (_not_json, ["config.json", "not valid JSON"]),
    "config-without-text_config": (_no_text_config, ["config.json", "no text_config"]),
    # 8 heads x 64 = 512, the checkpoint's attention has 4 x 64 = 256 (o_proj sorts before q_proj)
    "heads-vs-attention-shape": (
        lambda s, d: _with_text_config(s, d, num_attention_heads=8),
        ["model.safetensors", "layers.0.self_attn.o_proj.weight' has shape [256, 256]", "[256, 512]", "num_attention_heads*head_dim"],
    ),
    "vocab-vs-embedding-rows": (
        lambda s, d: _with_text_config(s, d, vocab_size=5000),
        ["embed_tokens.weight' has shape [4352, 256]", "[5000, 256]", "vocab_size"],
    ),
    "shard-in-index-missing": (_missing_shard, ["model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing"]),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_one_line_exit_2_no_output(tmp_path, tiny_random, case):
    make, needles = BAD_CHECKPOINTS[case]
    model = make(Path(tiny_random), tmp_path / "model")
    out = tmp_path / "out"
    line = _one_error(_cli("run", str(_recipe(tmp_path, model, out))))
    for needle in needles:
        assert needle in line, line
    assert not out.exists() and not _siblings(out)


# Where no tmpfs can be mounted (not root), the safetensors writer's file write fails with
# ENOSPC instead: injected in the subprocess, a stand-in for a full device.
_ENOSPC_RUN = """
import errno, sys
import safetensors.torch
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
safetensors.torch.save_file = full
from quantize.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_full_disk_one_line_exit_2_nothing_left(tmp_path, tiny_random):
    """A real full device: a 2 MiB tmpfs (we run as root here); the artifacts need ~270 MB."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode == 0
    out = disk / "out"
    try:
        args = ["run", str(_recipe(tmp_path, tiny_random, out))]
        if mounted:
            r = _cli(*args)
        else:
            r = subprocess.run([sys.executable, "-c", _ENOSPC_RUN, *args], capture_output=True, text=True, env=_env(), cwd=ROOT)
        line = _one_error(r)
        assert "no space left" in line and str(out) in line, line
        assert os.listdir(disk) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


# ------------------------------------------------------------------ paths and provenance


def test_recipe_paths_expand_home_and_variables(tmp_path, monkeypatch):
    from quantize.errors import RecipeError
    from quantize.recipe import parse_recipe

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DATA", str(tmp_path / "data"))
    r = parse_recipe({
        "model": "~/models/m", "output": "${DATA}/../out",
        "calibration": {"text": {"source": "files", "path": "$DATA/*.txt"},
                        "images": {"source": "hub", "dataset": "~/imgs"}},
    })
    assert r.model == f"{tmp_path}/models/m" and r.output == f"{tmp_path}/data/../out"
    assert r.calibration.text.path == f"{tmp_path}/data/*.txt" and r.calibration.images.dataset == f"{tmp_path}/imgs"
    assert parse_recipe({"model": "google/gemma-3n-E4B-it", "output": "o"}).model == "google/gemma-3n-E4B-it"
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(RecipeError, match=r"output: environment variable \$NOT_SET_ANYWHERE .* is not set"):
        parse_recipe({"model": "m", "output": "$NOT_SET_ANYWHERE/out"})


def test_same_inputs_same_bytes_in_any_folder(tmp_path, tiny_random):
    """The recipe run from two model folders (the original and a copy elsewhere) into two
    output folders (``~/out`` and ``$OUTROOT/out``, expanded) gives identical files, manifest
    included, and none of them names a folder of this machine."""
    from gguf import GGUFReader

    tiny_random = Path(tiny_random)
    copy = tmp_path / "elsewhere" / tiny_random.name
    copy.mkdir(parents=True)
    for f in tiny_random.iterdir():
        os.link(f, copy / f.name)  # a copy (same file system, so no 350 MB written)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(model="$MODEL_DIR", out="~/out"))
    home, root = tmp_path / "home", tmp_path / "root"
    cwd = tmp_path / "cwd"
    for d in (home, root, cwd):
        d.mkdir()
    r1 = _cli("run", str(recipe), env=_env(HOME=str(home), MODEL_DIR=str(tiny_random)), cwd=cwd)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _cli("run", str(recipe), "--out", "$OUTROOT/out", env=_env(HOME=str(home), MODEL_DIR=str(copy), OUTROOT=str(root)), cwd=cwd)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = home / "out", root / "out"
    assert list(cwd.iterdir()) == []  # no folder literally named "~" or "$OUTROOT"
    assert _tree(a) == _tree(b) and len(_tree(a)) >= 5

    gguf = next(a.glob("*.gguf"))
    fields = GGUFReader(str(gguf)).fields
    recorded = json.loads(fields["quantize.recipe"].contents())
    assert "output" not in recorded and recorded["model"] == tiny_random.name
    assert fields["quantize.provenance.source_model"].contents() == tiny_random.name
    manifest = json.loads((a / "manifest.json").read_text())
    assert "output" not in manifest["recipe"] and manifest["model"]["ref"] == tiny_random.name
    # The folders this machine read from and wrote to. (The source's own files may carry paths
    # of their own making, e.g. a tokenizer_config.json's vocab_file; those are input content,
    # copied as they are.)
    for p in a.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            for local in (str(tmp_path), str(tiny_random)):
                assert local.encode() not in data, (p, local)


@pytest.mark.parametrize("overwrite", [False, True])
def test_home_folder_as_output_is_refused_without_suggesting_overwrite(tmp_path, tiny_random, overwrite):
    # `--out ~`: even --overwrite must not move the home folder aside; the line must not offer it
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "mine.txt").write_text("keep me")
    args = ["run", str(_recipe(tmp_path, tiny_random, "unused")), "--out", "~"] + (["--overwrite"] if overwrite else [])
    line = _one_error(_cli(*args, env=_env(HOME=str(home))))
    assert f"output: {home} is or contains your home folder" in line and "--overwrite" not in line
    assert (home / "notes" / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "r.yaml"]
