"""The sweep on Ray: the only module that imports Ray.

Each variant is one task that builds the variant on its node's disk and returns its files
through the object store; the driver writes them with ``atomic_folder``. A task whose worker
dies is retried (``max_retries``); exceptions (a bad recipe) are not. Evaluation tasks ask for
a device's custom resource, so they run only on the nodes started with it, and receive the
GGUF and the model's KL base through the object store. Every state change of a variant is one
log line: queued, running on node X, done, skipped, failed with its error.

A task that no node of the cluster could ever run (a custom resource nobody offers, more
memory than any node has, a GPU on a CPU-only cluster) is cancelled after
``pending_timeout_s`` with a line that says what is missing; a task that merely waits for a
busy node waits. Ctrl-C cancels every task and leaves only the variants already written.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantize.errors import QuantizeError
from quantize.sweep import files, variants as V, work
from quantize.sweep.spec import EvalDevice, SweepSpec
from quantize.sweep.variants import Variant

log = logging.getLogger(__name__)

POLL_S = 0.5
GIB = 1 << 30


# ---- tasks (run on workers) ---------------------------------------------------------------

def _started(progress, job_id: int) -> str:
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    progress.put((job_id, ray.util.get_node_ip_address(), node_id))
    return node_id


def _build_task(progress, job_id: int, recipe_json: dict):
    """Returns (files without the text GGUF, the text GGUF or None): two objects, so an
    evaluation task receives the GGUF alone, as a uint8 array (which Ray hands to a task
    without copying it out of the node's object store)."""
    _started(progress, job_id)
    out = work.build_variant(recipe_json)
    gguf = V.text_gguf(json.loads(out["manifest.json"]))
    data = np.frombuffer(out.pop(gguf["path"]), dtype=np.uint8) if gguf else None
    return out, data


def _reference_task(progress, job_id: int, model: str, seq_len: int, n_windows: int):
    _started(progress, job_id)
    return work.reference_base(model, seq_len, n_windows)


def _eval_task(progress, job_id: int, name: str, filename: str, data, base, device: dict, latency: bool, extra: dict):
    node_id = _started(progress, job_id)
    return work.evaluate_gguf(name, filename, data, base, device["device"], device["threads"], latency,
                              {**extra, "ray_node_id": node_id})


# ---- driver -------------------------------------------------------------------------------

@dataclass
class Job:
    label: str  # "variant X", "variant X on D", "reference of M"
    kind: str  # build | reference | eval
    options: dict
    refs: list = field(default_factory=list)
    variant: Variant | None = None
    device: EvalDevice | None = None
    model: str | None = None
    attempts: int = 0
    infeasible_since: float | None = None


@dataclass
class Outcome:
    states: dict[str, str] = field(default_factory=dict)  # job label -> done | skipped | failed: ...
    report: Path | None = None

    @property
    def failed(self) -> list[str]:
        return [f"{k}: {v}" for k, v in self.states.items() if v.startswith("failed")]


def _describe(options: dict) -> str:
    req = V.flat_request(options)
    parts = [f"CPU {req.pop('CPU'):g}"]
    if gpu := req.pop("GPU"):
        parts.append(f"GPU {gpu:g}")
    parts.append(f"memory {req.pop('memory') / GIB:.2f} GiB")
    parts += [f"{k} {v:g}" for k, v in req.items()]
    return ", ".join(parts)


def _error_line(e: BaseException) -> str:
    import ray.exceptions as rex

    cause = getattr(e, "cause", None) if isinstance(e, rex.RayTaskError) else None
    if cause is not None:
        e = cause
    if isinstance(e, QuantizeError):
        return str(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class _Sweep:
    def __init__(self, spec: SweepSpec, variants: list[Variant]):
        import ray
        from ray.util.queue import Queue

        self.ray = ray
        self.spec = spec
        self.variants = variants
        self.outcome = Outcome()
        self.jobs: dict[int, Job] = {}
        self.pending: dict = {}  # first ref -> job id
        self.references: dict[str, list] = {}  # model -> [ref]
        self.checkpoint_bytes: dict[str, int] = {}
        self.new_results = False
        # Tasks report where they start through this queue (an actor that holds no CPU).
        self.progress = Queue(actor_options={"num_cpus": 0})
        self.retries = {"max_retries": spec.max_retries, "retry_exceptions": False}
        self.build_fn = ray.remote(num_returns=2)(_build_task)
        self.reference_fn = ray.remote(_reference_task)
        self.eval_fn = ray.remote(_eval_task)

    # -- submission

    def _submit(self, job: Job, fn, *args) -> None:
        job_id = len(self.jobs)
        self.jobs[job_id] = job
        refs = fn.options(**self.retries, **job.options).remote(self.progress, job_id, *args)
        job.refs = refs if isinstance(refs, list) else [refs]
        self.pending[job.refs[0]] = job_id
        log.info("%s: queued (%s)", job.label, _describe(job.options))

    def submit_builds(self, builds) -> None:
        for b in builds:
            v = b.variant
            if b.options is None:
                self.outcome.states[f"variant {v.name}"] = "skipped"
                log.info("variant %s: skipped (%s holds this recipe's output, hash %s)", v.name, v.out, v.recipe_hash[:12])
                self._submit_evals_from_disk(v)
                continue
            self.checkpoint_bytes[v.recipe.model] = b.checkpoint_bytes
            self._submit(Job(f"variant {v.name}", "build", b.options, variant=v), self.build_fn, v.recipe.model_dump(mode="json"))

    def _reference(self, model: str):
        if model not in self.references:
            if model not in self.checkpoint_bytes:
                from quantize.model import Checkpoint, resolve_model

                self.checkpoint_bytes[model] = sum(f.stat().st_size for f in Checkpoint(resolve_model(model)).files)
            options = {"num_cpus": 1, "memory": V.reference_memory(self.checkpoint_bytes[model])}
            job = Job(f"reference of {model}", "reference", options, model=model)
            self._submit(job, self.reference_fn, model, self.spec.eval.seq_len, self.spec.eval.n_windows)
            self.references[model] = job.refs
        return self.references[model][0]

    def _submit_evals(self, v: Variant, gguf: dict, data_ref, only_missing: bool) -> None:
        if self.spec.eval is None:
            return
        for d in self.spec.eval.devices:
            label = f"variant {v.name} on {d.name}"
            if only_missing and V.eval_is_done(V.result_path(self.spec, d.name, v.name), gguf["sha256"], self.spec):
                self.outcome.states[label] = "skipped"
                log.info("%s: skipped (results of this GGUF are there)", label)
                continue
            options = {"num_cpus": d.num_cpus, "memory": V.eval_memory(gguf["bytes"]), "resources": dict(d.resources)}
            job = Job(label, "eval", options, variant=v, device=d)
            self._submit(job, self.eval_fn, v.name, str(v.out / gguf["path"]), data_ref, self._reference(v.recipe.model),
                         {"device": d.device, "threads": d.threads}, self.spec.eval.latency,
                         {"sweep": self.spec.name, "sweep_device": d.name})

    def _submit_evals_from_disk(self, v: Variant) -> None:
        if self.spec.eval is None:
            return
        gguf = V.text_gguf(V.read_manifest(v.out) or {})
        if gguf is None:
            log.warning("variant %s: no GGUF to evaluate (the recipe exports none)", v.name)
            return
        missing = [d for d in self.spec.eval.devices
                   if not V.eval_is_done(V.result_path(self.spec, d.name, v.name), gguf["sha256"], self.spec)]
        data_ref = self.ray.put(np.fromfile(v.out / gguf["path"], dtype=np.uint8)) if missing else None
        self._submit_evals(v, gguf, data_ref, only_missing=True)

    # -- events

    def _drain_progress(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                job_id, ip, node_id = self.progress.get_nowait()
            except Empty:
                return
            job = self.jobs[job_id]
            job.attempts += 1
            job.infeasible_since = None
            again = f" (attempt {job.attempts}: the previous attempt's worker died)" if job.attempts > 1 else ""
            log.info("%s: running on node %s (%s)%s", job.label, ip, node_id[:12], again)

    def _finish(self, ref) -> None:
        job = self.jobs[self.pending.pop(ref)]
        try:
            values = self.ray.get(job.refs)
        except Exception as e:  # the task's own error, or the worker's death after the last retry
            self._fail(job, _error_line(e))
            return
        if job.kind == "build":
            self._finish_build(job, *values)
        elif job.kind == "eval":
            path = V.result_path(self.spec, job.device.name, job.variant.name)
            from eval.atomic_file import write_text_atomic

            write_text_atomic(path, json.dumps(values[0], indent=2, sort_keys=True) + "\n")
            self.new_results = True
            self.outcome.states[job.label] = "done"
            q = values[0]["quality"]
            log.info("%s: done: ppl %.4f, KL mean %.6f -> %s", job.label, q["ppl"], q["kl"]["mean"], path)
        else:
            self.outcome.states[job.label] = "done"
            log.info("%s: done", job.label)

    def _finish_build(self, job: Job, out: dict, gguf_data) -> None:
        v = job.variant
        manifest = json.loads(out["manifest.json"])
        gguf = V.text_gguf(manifest)
        if gguf is not None:
            out = {**out, gguf["path"]: gguf_data}
        try:
            files.write_folder(v.out, out)
        except QuantizeError as e:  # e.g. someone put files into the folder meanwhile: refused, untouched
            self._fail(job, str(e))
            return
        self.outcome.states[job.label] = "done"
        log.info("%s: done -> %s (%d files, %.1f MB)", job.label, v.out, len(out), sum(map(len, out.values())) / 1e6)
        if gguf is not None:
            self._submit_evals(v, gguf, job.refs[1], only_missing=False)
        elif self.spec.eval is not None:
            log.warning("variant %s: no GGUF to evaluate (the recipe exports none)", v.name)

    def _fail(self, job: Job, why: str) -> None:
        self.outcome.states[job.label] = f"failed: {why}"
        log.error("%s: failed: %s", job.label, why)
        if job.kind == "reference":  # its evaluations cannot run
            for ref, jid in list(self.pending.items()):
                other = self.jobs[jid]
                if other.kind == "eval" and other.variant.recipe.model == job.model:
                    self.ray.cancel(ref, force=True)
                    self.pending.pop(ref)
                    self._fail(other, f"the KL base of {job.model} failed")

    def _check_feasible(self) -> None:
        """Cancel tasks that no node could run for longer than ``pending_timeout_s``."""
        totals = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        now = time.monotonic()
        for ref, jid in list(self.pending.items()):
            job = self.jobs[jid]
            if job.attempts or V.feasible(V.flat_request(job.options), totals):
                job.infeasible_since = None
                continue
            if job.infeasible_since is None:
                job.infeasible_since = now
                log.warning("%s: waiting: no node of the cluster offers %s (waiting up to %g s for one to join)",
                            job.label, _describe(job.options), self.spec.pending_timeout_s)
            elif now - job.infeasible_since >= self.spec.pending_timeout_s:
                self.ray.cancel(ref, force=True)
                self.pending.pop(ref)
                custom = {k: int(v) if float(v).is_integer() else v for k, v in (job.options.get("resources") or {}).items()}
                if custom and not V.feasible(custom, totals):
                    why = (f"no node offered {', '.join(f'{k}={v}' for k, v in custom.items())} within {self.spec.pending_timeout_s:g} s "
                           f"(join one with: ray start --address=HEAD:6379 --resources='{json.dumps(custom)}')")
                else:
                    why = f"no node of the cluster has {_describe(job.options)} (waited {self.spec.pending_timeout_s:g} s)"
                self._fail(job, why)

    def run(self, builds) -> Outcome:
        try:
            self.submit_builds(builds)
            while self.pending:
                ready, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=POLL_S, fetch_local=False)
                self._drain_progress()  # "running on" lines before "done" lines
                for ref in ready:
                    self._finish(ref)
                self._check_feasible()
            self._drain_progress()
        except BaseException as e:  # Ctrl-C, SIGTERM, or a driver-side failure: no task outlives the sweep
            for ref in self.pending:
                self.ray.cancel(ref, force=True)
            done = sorted(k.removeprefix("variant ") for k, s in self.outcome.states.items()
                          if s in ("done", "skipped") and k.startswith("variant ") and " on " not in k)
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"stopped ({type(e).__name__})"
            log.warning("%s: cancelled %d task(s); complete: %s", why, len(self.pending), ", ".join(done) or "none")
            raise
        finally:
            try:
                self.progress.shutdown()
            except Exception:  # the cluster may already be gone after Ctrl-C
                pass
        self._report()
        return self.outcome

    def _report(self) -> None:
        if self.spec.eval is None:
            return
        paths = [p for v in self.variants for d in self.spec.eval.devices if (p := V.result_path(self.spec, d.name, v.name)).is_file()]
        report = Path(self.spec.output) / "report.md"
        if not paths:
            return
        if self.new_results or not report.is_file():  # a sweep that did nothing touches nothing
            from eval.report import write_report

            md, _, _ = write_report(paths, self.spec.output)
            log.info("report: %s (%d results)", md, len(paths))
        self.outcome.report = report


def _check_reachable(address: str) -> None:
    """Ray retries an unreachable head for minutes; a plain ``HOST:PORT`` is tried first."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # ray://, auto: Ray's own resolution
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise QuantizeError(f"--address {address}: no Ray head answers there ({e.strerror or e}); "
                            f"start one with: ray start --head --port={port}") from None


def run_sweep(spec: SweepSpec, variants: list[Variant], address: str | None = None) -> Outcome:
    """Run the sweep on the Ray cluster this process is connected to, or on ``address``, or on
    a local Ray instance started (and stopped) here. Every variant is checked first
    (``quantize.sweep.plan``): bad input fails before Ray starts."""
    from quantize.sweep import plan

    builds = plan(spec, variants)
    try:
        import ray
    except ImportError:
        raise QuantizeError("quantize sweep needs Ray: pip install 'gemma3n-quantize[sweep]'") from None
    started = False
    if not ray.is_initialized():
        if address:
            _check_reachable(address)
        try:
            # Worker output (progress bars of every task) stays in Ray's session logs: the
            # driver prints one line per state change instead.
            ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
        except ConnectionError as e:
            raise QuantizeError(f"--address {address}: cannot join the Ray cluster ({str(e).splitlines()[0]})") from None
        started = True
    try:
        return _Sweep(spec, variants).run(builds)
    finally:
        if started:
            ray.shutdown()
