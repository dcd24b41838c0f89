"""Sweeps: grid expansion, schema errors, resume and resource rules as pure functions; then, on
a local Ray cluster (2 CPUs, one custom resource), a three-variant sweep of the tiny model
checked against plain ``quantize run`` byte for byte, a worker killed mid-task, evaluation
routed by resource and checked against ``eval`` run directly, an unschedulable device, resume
and Ctrl-C."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from quantize.errors import RecipeError
from quantize.manifest import recipe_record, sha256_file
from quantize.sweep import variants as V
from quantize.sweep.spec import SweepError, parse_sweep

TESTS = Path(__file__).parent
# RTN only, GGUF only: the cheapest real variants of the tiny model.
BASE = {"model": "builtin:tiny-random", "output": "ignored", "exports": {"gguf": {"mix": "auto", "mmproj": False}}}
TEXT_SCHEMES = ["int4", "int8", "int8_row"]


def _spec(**kw):
    return parse_sweep({"base": BASE, "output": "out/s", **kw}, "s.yaml")


# ---- pure functions -----------------------------------------------------------------------

def test_grid_is_the_product_of_its_axes_in_file_order(tmp_path):
    base = tmp_path / "recipes" / "base.yaml"
    base.parent.mkdir()
    base.write_text(yaml.safe_dump({**BASE, "towers": {"text": "int4", "vision": "keep"}}))
    spec = parse_sweep({"base": "recipes/base.yaml", "output": "out/s", "grid": {
        "towers.text": ["int4", {"preset": "int8", "group_size": 64}],
        "seed": [0, 7],
        "model": ["builtin:tiny-random"],  # one value: not in the names
    }})
    vs = V.expand(spec, tmp_path)
    assert [v.name for v in vs] == ["int4-0", "int4-7", "int8-64-0", "int8-64-7"]
    assert [(v.recipe.towers.text.type, v.recipe.towers.text.group_size, v.recipe.seed) for v in vs] == [
        ("int4", 32, 0), ("int4", 32, 7), ("int8", 64, 0), ("int8", 64, 7)]
    for v in vs:
        assert v.recipe.name == v.name and v.recipe.output == f"out/s/variants/{v.name}"
        assert v.recipe.towers.vision.type == "keep"  # the base file's other keys stay
    assert len({v.recipe_hash for v in vs}) == 4


def test_labels_that_collide_are_numbered():
    vs = V.expand(_spec(grid={"towers.text": [{"preset": "int4", "importance": True}, {"preset": "int4_gptq", "importance": True}]}))
    assert [v.name for v in vs] == ["int4-true", "int4_gptq-true"]
    vs = V.expand(_spec(grid={"calibration.text": [{"source": "embedded", "n_samples": 8}, {"source": "embedded", "n_samples": 8, "seq_len": 64}]}))
    assert [v.name for v in vs] == ["embedded-8", "embedded-8-64"]
    vs = V.expand(_spec(grid={"ignore": [["*lm_head*"], ["*lm_head*"]]}))
    assert [v.name for v in vs] == ["lm_head-1", "lm_head-2"]


@pytest.mark.parametrize("data, needle", [
    ({"base": BASE, "output": "o", "grd": {}}, "s.yaml: grd: Extra inputs are not permitted; valid keys: version, name, base, output, grid"),
    ({"base": BASE, "output": "o", "grid": {"towrs.text": ["int4"]}}, "towrs.text: not a recipe key; valid keys start with: version, model"),
    ({"base": BASE, "output": "o", "grid": {"output": ["a", "b"]}}, "output: set by the sweep for each variant"),
    ({"base": BASE, "output": "o", "grid": {"seed": []}}, "seed: give at least one value"),
    ({"base": BASE, "output": "o", "eval": {"devices": [{"name": "orin", "resources": {"jetson": 1}, "gpu": 1}]}},
     "eval.devices.0.gpu: Extra inputs are not permitted; valid keys: name, resources, device, threads, num_cpus"),
    ({"base": BASE, "output": "o", "eval": {"devices": [{"name": "a b", "resources": {"x": 1}}]}}, "eval.devices.0.name"),
], ids=["unknown-key", "unknown-recipe-key", "reserved", "empty-axis", "unknown-device-key", "bad-name"])
def test_schema_errors_name_the_key_and_what_is_valid(data, needle):
    with pytest.raises(SweepError) as e:
        parse_sweep(data, "s.yaml")
    assert needle in str(e.value)


def test_a_variant_that_is_no_valid_recipe_is_named():
    with pytest.raises(RecipeError, match=r"s.yaml \(variant int5\): towers.text: .*int5"):
        V.expand(_spec(grid={"towers.text": ["int4", "int5"]}), ".", "s.yaml")
    spec = parse_sweep({"base": {**BASE, "towers": {"text": "int4"}}, "output": "o", "grid": {"towers.text.group_size": [64]}})
    with pytest.raises(SweepError, match="towers.text.group_size: the base recipe's towers.text is 'int4', not a mapping"):
        V.expand(spec)


def test_resume_needs_a_manifest_of_this_very_recipe_with_its_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = V.expand(_spec(grid={"seed": [0, 1]}))
    assert not V.is_complete(a)
    a.out.mkdir(parents=True)
    (a.out / "x.gguf").write_bytes(b"12345")
    # The manifest as quantize run writes it: the recipe's record and each artifact's size.
    manifest = {"recipe": recipe_record(a.recipe), "artifacts": [{"path": "x.gguf", "bytes": 5, "sha256": "0"}]}
    (a.out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    assert V.is_complete(a)
    assert not V.is_complete(V.Variant(a.name, b.recipe.model_copy(update={"output": a.recipe.output})))  # seed 1 != 0
    (a.out / "x.gguf").write_bytes(b"1234")
    assert not V.is_complete(a)


def test_resource_requests_follow_the_documented_formula():
    spec = _spec(cpus_per_task=3)
    gib = 1 << 30
    recipe = V.expand(spec)[0].recipe
    assert V.task_resources(recipe, spec, 2 * gib, 16 * gib, False) == {"num_cpus": 3, "num_gpus": 0, "memory": 3 * gib + gib // 2}
    cuda = recipe.model_copy(update={"device": "cuda"})
    assert V.task_resources(cuda, spec, 2 * gib, 16 * gib, True) == {"num_cpus": 3, "num_gpus": 1, "memory": 19 * gib + gib // 2}
    assert V.task_memory(1, 0, False) == 3 * gib // 2 + (1 << 20)  # rounded up to a MiB
    nodes = [{"CPU": 16, "GPU": 1, "memory": 64 * gib}, {"CPU": 6, "memory": 6 * gib, "jetson_orin_nano": 1}]
    assert V.feasible(V.flat_request({"num_cpus": 1, "memory": gib, "resources": {"jetson_orin_nano": 1}}), nodes)
    assert not V.feasible(V.flat_request({"num_cpus": 1, "memory": 8 * gib, "resources": {"jetson_orin_nano": 1}}), nodes)
    assert not V.feasible(V.flat_request({"num_cpus": 1, "num_gpus": 1, "memory": gib, "resources": {"jetson_orin_nano": 1}}), nodes)
    assert not V.feasible(V.flat_request({"num_cpus": 1, "resources": {"jetson_agx_thor": 1}}), nodes)


def test_cli_bad_sweep_is_one_line_exit_2(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"base": "nope.yaml", "output": str(tmp_path / "o")}))
    r = subprocess.run([sys.executable, "-m", "quantize", "sweep", str(p)], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert lines == [f"error: {tmp_path / 'nope.yaml'}: base recipe file not found"]
    assert not (tmp_path / "o").exists()


# ---- on a local Ray cluster ---------------------------------------------------------------

DEVICE_RESOURCE = "jetson_orin_nano"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_random):
    """One node, 2 CPUs, carrying the custom resource a Jetson would; workers run the fault
    hook (tests/sweep_faults.py) and keep their scratch folders in a folder we can inspect."""
    root = tmp_path_factory.mktemp("ray")
    scratch = root / "worker-tmp"
    scratch.mkdir()
    marker = root / "killed"
    env = {"GEMMA3N_SWEEP_KILL_MARKER": str(marker), "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    ray.init(num_cpus=2, resources={DEVICE_RESOURCE: 1}, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "sweep_faults.kill_first_build"})
    try:
        yield {"scratch": scratch, "marker": marker}
    finally:
        ray.shutdown()


def _sweep_file(folder: Path, **kw) -> Path:
    data = {"name": "tiny", "base": BASE, "output": "out/s", "grid": {"towers.text": TEXT_SCHEMES},
            "max_retries": 2, "pending_timeout_s": 2,
            "eval": {"n_windows": 2, "seq_len": 64, "devices": [{"name": "orin", "resources": {DEVICE_RESOURCE: 1}, "threads": 1}]}}
    data.update(kw)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run_sweep(path: Path, caplog):
    from quantize import sweep
    from quantize.sweep.ray_runner import run_sweep

    spec, variants = sweep.load(path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="quantize.sweep"):
        outcome = run_sweep(spec, variants)
    return spec, variants, outcome, [r.getMessage() for r in caplog.records if r.name.startswith("quantize.sweep")]


def _tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def swept(cluster, tmp_path_factory):
    """The three-variant sweep, run once from its own working folder."""
    work = tmp_path_factory.mktemp("sweep")
    old = os.getcwd()
    os.chdir(work)
    try:
        caplog = _Capture()
        spec, variants, outcome, lines = _run_sweep(_sweep_file(work), caplog)
    finally:
        os.chdir(old)
    return {"work": work, "spec": spec, "variants": variants, "outcome": outcome, "lines": lines}


class _Capture:
    """caplog for a module-scoped fixture (pytest's caplog is function-scoped)."""

    def __init__(self):
        self.records = []
        self._h = logging.Handler()
        self._h.emit = self.records.append

    def clear(self):
        self.records.clear()

    def at_level(self, level, logger):
        import contextlib

        @contextlib.contextmanager
        def cm():
            lg = logging.getLogger(logger)
            old = lg.level
            lg.setLevel(level)
            lg.addHandler(self._h)
            try:
                yield
            finally:
                lg.removeHandler(self._h)
                lg.setLevel(old)
        return cm()


def test_sweep_artifacts_equal_plain_runs_byte_for_byte(swept, tmp_path, monkeypatch):
    from quantize.cli import main

    outcome = swept["outcome"]
    assert {k: v for k, v in outcome.states.items() if k.startswith("variant ") and " on " not in k} == {
        f"variant {s}": "done" for s in TEXT_SCHEMES}
    monkeypatch.chdir(tmp_path)  # the same relative output, in another folder
    for v in swept["variants"]:
        recipe = tmp_path / f"{v.name}.yaml"
        recipe.write_text(yaml.safe_dump(v.recipe.model_dump(mode="json")))
        assert main(["run", str(recipe)]) == 0
        ours, theirs = _tree(swept["work"] / v.out), _tree(tmp_path / v.out)
        assert sorted(ours) == sorted(theirs) and any(f.endswith(".gguf") for f in ours)
        for f in ours:
            assert ours[f][0] == theirs[f][0], f"{v.name}/{f} differs from quantize run's"


def test_killed_worker_is_retried_leaving_each_variant_once_and_whole(swept, cluster):
    killed = cluster["marker"].read_text()
    assert killed in TEXT_SCHEMES
    lines = swept["lines"]
    assert any(l.startswith(f"variant {killed}: running on node ") and "(attempt 2: the previous attempt's worker died)" in l for l in lines), lines
    assert sum(l.startswith(f"variant {killed}: done -> ") for l in lines) == 1
    folder = swept["work"] / "out/s/variants"
    assert sorted(p.name for p in folder.iterdir()) == sorted(TEXT_SCHEMES)  # no partial, no second copy
    for v in swept["variants"]:  # every file whole: the sha256 the worker's manifest recorded
        manifest = json.loads((swept["work"] / v.out / "manifest.json").read_text())
        for a in manifest["artifacts"]:
            assert sha256_file(swept["work"] / v.out / a["path"]) == a["sha256"]
    assert list(cluster["scratch"].glob("gemma3n-sweep-*")) == []  # the killed worker's scratch folder was removed too


def test_eval_runs_on_the_node_with_the_device_resource(swept, tiny_random, tmp_path):
    from eval.run import RunSettings, evaluate_many

    node = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(DEVICE_RESOURCE)]
    assert len(node) == 1
    work, spec = swept["work"], swept["spec"]
    results = {}
    for v in swept["variants"]:
        r = json.loads((work / V.result_path(spec, "orin", v.name)).read_text())
        assert r["settings"]["ray_node_id"] == node[0] and r["backend"] == "llamacpp" and r["name"] == v.name
        assert r["artifact"]["path"] == str(v.out / V.text_gguf(json.loads((work / v.out / "manifest.json").read_text()))["path"])
        assert any(l == f"variant {v.name} on orin: running on node {ray.util.get_node_ip_address()} ({node[0][:12]})" for l in swept["lines"])
        results[v.name] = r
    # The independent reference: eval's own command path on the files the sweep wrote.
    ggufs = [work / v.out / V.text_gguf(json.loads((work / v.out / "manifest.json").read_text()))["path"] for v in swept["variants"]]
    direct = evaluate_many(ggufs, tiny_random, tmp_path, "llamacpp", RunSettings(seq_len=64, n_windows=2, threads=1))
    for v, p in zip(swept["variants"], direct):
        d = json.loads(Path(p).read_text())
        assert d["artifact"]["sha256"] == results[v.name]["artifact"]["sha256"]
        assert results[v.name]["quality"]["ppl"] == pytest.approx(d["quality"]["ppl"], rel=1e-6)
        assert results[v.name]["quality"]["kl"]["mean"] == pytest.approx(d["quality"]["kl"]["mean"], rel=1e-5, abs=1e-9)
    report = (work / "out/s/report.md").read_text()
    for v in swept["variants"]:
        assert f"| {v.name} | llamacpp |" in report


def test_rerun_skips_everything_and_touches_nothing(swept, caplog, monkeypatch):
    work = swept["work"]
    before = _tree(work / "out")
    monkeypatch.chdir(work)
    _, variants, outcome, lines = _run_sweep(work / "sweep.yaml", caplog)
    assert set(outcome.states.values()) == {"skipped"} and len(outcome.states) == 2 * len(variants)
    assert sum("skipped" in l for l in lines) == 2 * len(variants) and not any("queued" in l for l in lines)
    assert _tree(work / "out") == before  # same files, same bytes, same mtimes


def test_device_no_node_offers_fails_clearly_after_the_timeout(swept, caplog, monkeypatch):
    work = swept["work"]
    monkeypatch.chdir(work)
    path = _sweep_file(work, pending_timeout_s=1, eval={"n_windows": 2, "seq_len": 64,
                                                        "devices": [{"name": "thor", "resources": {"jetson_agx_thor": 1}}]})
    try:
        _, variants, outcome, lines = _run_sweep(path, caplog)
    finally:
        _sweep_file(work)
    for v in variants:
        assert outcome.states[f"variant {v.name}"] == "skipped"
        state = outcome.states[f"variant {v.name} on thor"]
        assert state.startswith("failed: no node offered jetson_agx_thor=1 within 1 s"), state
        assert f"variant {v.name} on thor: waiting: no node of the cluster offers CPU 1, memory" in "\n".join(lines)
    assert not (work / "out/s/results/thor").exists()


def test_ctrl_c_cancels_and_leaves_only_complete_variants(cluster, tmp_path, caplog, monkeypatch):
    import _thread

    monkeypatch.chdir(tmp_path)
    path = _sweep_file(tmp_path, cpus_per_task=2, eval=None, grid={"towers.text": TEXT_SCHEMES})  # one at a time

    class InterruptAfterFirst(logging.Handler):
        def emit(self, record):
            if ": done -> " in record.getMessage():
                _thread.interrupt_main()

    h = InterruptAfterFirst()
    logging.getLogger("quantize.sweep").addHandler(h)
    # interrupt_main does nothing while SIGINT is ignored, as in a job a shell started with `&`
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _run_sweep(path, caplog)
    finally:
        logging.getLogger("quantize.sweep").removeHandler(h)
        signal.signal(signal.SIGINT, previous)
    from quantize import sweep

    _, variants = sweep.load(path)
    present = sorted(p.name for p in (tmp_path / "out/s/variants").iterdir())
    assert len(present) == 1 and V.is_complete(next(v for v in variants if v.name == present[0]))
    assert any(l.startswith("interrupted: cancelled 2 task(s); complete: ") for l in (r.getMessage() for r in caplog.records))


def test_cli_joins_the_cluster_by_address(swept):
    """A second driver (the command line) joins the running cluster: everything is there, so it
    skips every variant and evaluation and exits 0."""
    address = ray.get_runtime_context().gcs_address
    r = subprocess.run([sys.executable, "-m", "quantize", "sweep", "sweep.yaml", "--address", address],
                       cwd=swept["work"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    n = len(swept["variants"])
    assert f"sweep tiny: {2 * n} skipped; report out/s/report.md" in r.stdout, r.stdout
    assert r.stderr.count(": skipped (") == 2 * n, r.stderr[-3000:]


def test_a_missing_evaluation_alone_is_run_again_from_the_written_gguf(swept, caplog, monkeypatch):
    work, spec = swept["work"], swept["spec"]
    monkeypatch.chdir(work)
    gone = work / V.result_path(spec, "orin", "int8")
    old = json.loads(gone.read_text())
    gone.unlink()
    before = _tree(work / "out/s/variants")
    _, variants, outcome, lines = _run_sweep(work / "sweep.yaml", caplog)
    assert outcome.states["variant int8 on orin"] == "done"
    assert {k for k, s in outcome.states.items() if s != "skipped"} == {"variant int8 on orin", "reference of builtin:tiny-random"}
    assert _tree(work / "out/s/variants") == before
    new = json.loads(gone.read_text())
    assert new["artifact"] == old["artifact"] and new["quality"] == old["quality"]


def test_dry_run_lists_requests_and_a_foreign_folder_stops_the_sweep_before_ray(tmp_path, monkeypatch, capsys):
    from quantize.cli import main

    monkeypatch.chdir(tmp_path)
    path = _sweep_file(tmp_path, eval=None, grid={"towers.text": ["int4", "int8"]})
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sweep tiny: 2 variant(s) -> out/s/variants" in out
    assert "  int4: towers.text='int4'; asks CPU 1, GPU 0, memory " in out and "  int8: towers.text='int8'" in out
    mine = tmp_path / "out/s/variants/int8/notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output: out/s/variants/int8 holds notes.txt") and "did not write" in err[0]
    assert mine.read_text() == "mine" and sorted(p.name for p in mine.parent.parent.iterdir()) == ["int8"]
