"""Thin command line: parse arguments, call the library, map its exceptions to exit codes.

Exit codes: 0 success; 2 bad input (recipe, model, data, request, full disk), one line on
stderr; 1 an unexpected failure (traceback), or the recipe's evaluation failed after the
artifacts were written (one line; the artifacts are kept); 130 interrupted (SIGINT), 143 terminated (SIGTERM).
Both signals unwind through the library, so its temporary folders are removed on the way out.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

log = logging.getLogger("quantize")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantize", description="Quantize Gemma 3n for edge devices.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a recipe (or print its plan with --dry-run)")
    r.add_argument("recipe", help="recipe YAML file")
    r.add_argument("--model", help="override the recipe's model (folder, hub id or builtin:tiny-trained)")
    r.add_argument("--out", help="override the recipe's output folder")
    r.add_argument("--device", help="override the recipe's device (cpu, cuda, cuda:N)")
    r.add_argument("--dry-run", action="store_true", help="print the plan (schemes and bytes) and stop")
    r.add_argument("--force", action="store_true", help="write GGUF even where llama.cpp's hard-coded layout differs")
    r.add_argument("--overwrite", action="store_true",
                   help="an existing output folder this tool did not write is moved aside to NAME.backup-N (never deleted)")
    r.add_argument("--allow-pickle", action="store_true", help="accept pickle checkpoints (they can run code)")
    r.add_argument("--no-eval", action="store_true", help="skip the recipe's eval: section")
    r.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")

    m = sub.add_parser("make-tiny", help="build a tiny Gemma 3n model folder (offline, seeded)")
    m.add_argument("out", help="output folder")
    m.add_argument("--flavour", choices=("random", "trained"), default="random")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-dead-kv", action="store_true", help="omit consumer layers' dead k/v (as transformers>=5 saves)")

    i = sub.add_parser("inspect", help="print towers, sizes, KV-sharing groups and dead k/v of a model")
    i.add_argument("model", help="folder, hub id or builtin:tiny-trained")
    i.add_argument("--json", action="store_true")
    i.add_argument("--allow-pickle", action="store_true")

    f = sub.add_parser("fit", help="choose every text tensor's GGUF type by measurement for a memory budget or device")
    f.add_argument("recipe", help="recipe YAML file (its exports.gguf.fit is used when no budget is given here)")
    f.add_argument("--budget", help="size of the text GGUF: bytes (3.5GB, 3500MiB) or bits per weight (4.5bpw)")
    f.add_argument("--device-profile", help="a device profile (its memory minus KV cache, mmproj and compute buffers)")
    f.add_argument("--context", type=int, help="with --device-profile: context length in tokens (default 4096)")
    f.add_argument("--vision", action="store_true", help="with --device-profile: the vision mmproj shares the memory")
    f.add_argument("--model", help="override the recipe's model")
    f.add_argument("--out", help="override the recipe's output folder (the fitted recipe goes beside it: OUT.fit.yaml)")
    f.add_argument("--dry-run", action="store_true", help="measure and print the budget breakdown and chosen types; write nothing")
    f.add_argument("--overwrite", action="store_true", help="as for run")
    f.add_argument("--allow-pickle", action="store_true")
    f.add_argument("--no-eval", action="store_true", help="skip measuring the written GGUF's KL")

    w = sub.add_parser("sweep", help="run a grid of recipe variants as Ray tasks and evaluate them on the cluster's devices")
    w.add_argument("sweep", help="sweep YAML file (a base recipe, a grid, eval devices)")
    w.add_argument("--address", help="join this Ray cluster (HOST:PORT or ray://...); default: a local Ray instance")
    w.add_argument("--dry-run", action="store_true", help="list the variants, their resource requests and what a run would skip")
    return p


def _cmd_run(args) -> int:
    from quantize.errors import RecipeError
    from quantize.pipeline import run
    from quantize.plan import format_plan
    from quantize.recipe import load_recipe

    if args.json and not args.dry_run:
        raise RecipeError("--json goes with --dry-run (it prints the plan as JSON)")
    recipe = load_recipe(args.recipe, model=args.model, output=args.out, device=args.device)
    if args.force and (recipe.exports.gguf is None or not recipe.exports.gguf.enabled):
        raise RecipeError(f"--force: {args.recipe} writes no GGUF (exports.gguf), the only export --force applies to")
    if args.force:
        gguf = recipe.exports.gguf.model_copy(update={"force": True})
        recipe = recipe.model_copy(update={"exports": recipe.exports.model_copy(update={"gguf": gguf})})
    if args.no_eval:  # the artifacts do not record the eval section, so they stay byte-identical
        recipe = recipe.model_copy(update={"eval": None})
    if recipe.exports.gguf is not None and recipe.exports.gguf.fit is not None:  # the recipe asks fit to choose
        args.budget = args.device_profile = None
        args.context, args.vision = None, False
        return _cmd_fit(args, recipe)
    result = run(recipe, dry_run=args.dry_run, allow_pickle=args.allow_pickle, overwrite=args.overwrite)
    if args.dry_run:
        if args.json:
            print(json.dumps(result.plan.to_json(), indent=2))
        else:
            print(format_plan(result.plan))
            if result.compute_dtype is not None:
                print("text decoder calibration forward: %s (%s)" % result.compute_dtype)
            st = recipe.exports.safetensors
            if st is not None and st.enabled:
                from quantize.formats.safetensors.writer import predicted_bytes

                print(f"predicted safetensors artifact ({st.format}): {predicted_bytes(result.plan, st, result.model_folder):,} bytes")
            gguf = recipe.exports.gguf
            if gguf is not None and gguf.enabled:
                from quantize.pipeline import gguf_text_plan
                from quantize.formats.gguf import describe_text_plan

                print(describe_text_plan(gguf_text_plan(recipe, result.model_folder, result.plan)))
        return 0
    print(f"wrote {result.out_dir}:")
    for a in result.artifacts:
        print(f"  {a}")
    print(f"  {result.out_dir / 'manifest.json'}")
    if result.eval is not None and "error" in result.eval:
        # The artifacts are complete and kept; only their evaluation failed.
        print(f"error: eval: {result.eval['error']} (the artifacts in {result.out_dir} are complete; "
              f"manifest.json records the failure; rerun with --no-eval or use python -m eval run)", file=sys.stderr)
        return 1
    if result.eval is not None:
        print(f"  {result.out_dir / result.eval['report'][0]}")
    return 0


def _cmd_fit(args, recipe=None) -> int:
    from quantize.fit.run import describe, fit, kl_text
    from quantize.fit.spec import FitSpec
    from quantize.recipe import load_recipe

    if recipe is None:
        recipe = load_recipe(args.recipe, model=args.model, output=args.out)
    given = recipe.exports.gguf.fit if recipe.exports.gguf is not None else None
    if args.budget or args.device_profile:
        try:
            spec = FitSpec(budget=args.budget, device=args.device_profile, context=4096 if args.context is None else args.context, vision=args.vision)
        except ValueError as e:  # pydantic's ValidationError: one line naming the flag
            from quantize.errors import RecipeError

            first = e.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise RecipeError((f"--{where}: " if where else "") + first["msg"].removeprefix("Value error, ")) from None
    elif given is not None:
        spec = given
    else:
        from quantize.errors import RecipeError

        raise RecipeError(f"{args.recipe}: fit needs --budget, --device-profile or exports.gguf.fit in the recipe")
    res = fit(recipe, spec, dry_run=args.dry_run, allow_pickle=args.allow_pickle, overwrite=args.overwrite,
              run_eval=not args.no_eval)
    print(describe(res))
    if args.dry_run:
        return 0
    gguf = next(p for p in res.run.artifacts if p.suffix == ".gguf" and not p.name.startswith("mmproj"))
    print(f"wrote {res.recipe_path} (plain recipe) and {res.run.out_dir}: {gguf.name} {gguf.stat().st_size:,} bytes "
          f"(budget {res.budget_bytes:,}); predicted KL {kl_text(res)}")
    from quantize.fit.run import measured_kl

    kl = measured_kl(res.run, gguf)
    if kl is not None:
        print(f"measured KL {kl:.4g} (llama.cpp, eval/ in the output; the manifest records both)")
    return 0


def _cmd_make_tiny(args) -> int:
    from quantize.tiny import TinySpec, build_tiny

    path = build_tiny(args.out, TinySpec(flavour=args.flavour, seed=args.seed, dead_kv=not args.no_dead_kv))
    print(path)
    return 0


def _cmd_inspect(args) -> int:
    from quantize.inspect_model import describe, format_description
    from quantize.model import Checkpoint, resolve_model

    ckpt = Checkpoint(resolve_model(args.model, allow_pickle=args.allow_pickle))
    desc = describe(ckpt)
    print(json.dumps(desc, indent=2) if args.json else format_description(desc))
    return 0


def _cmd_sweep(args) -> int:
    from quantize import sweep

    spec, variants = sweep.load(args.sweep)
    if args.dry_run:
        print(sweep.describe(spec, sweep.plan(spec, variants)))
        return 0
    from quantize.sweep.ray_runner import run_sweep

    outcome = run_sweep(spec, variants, address=args.address)
    from collections import Counter

    counts = Counter(state.split(":")[0] for state in outcome.states.values())  # done, skipped, failed
    print(f"sweep {spec.name}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
          + (f"; report {outcome.report}" if outcome.report else ""))
    for line in outcome.failed:
        print(f"  {line}", file=sys.stderr)
    return 1 if outcome.failed else 0


COMMANDS = {"run": _cmd_run, "fit": _cmd_fit, "make-tiny": _cmd_make_tiny, "inspect": _cmd_inspect, "sweep": _cmd_sweep}


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that ``finally`` and cleanup blocks run."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, as a KeyboardInterrupt of our own type. CPython remembers a plain KeyboardInterrupt
    that ends any string ``exec``/``eval`` (``run_eval_code_obj``: dataclasses, namedtuple and
    lazy imports run those), even one caught afterwards, and under ``python -m`` it then kills the
    process with SIGINT at exit instead of returning our 130 (a clean-clone CI run got returncode
    -2 after "interrupted"). It compares the exact type, so a subclass does not set that flag."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _on_sigint(signum, frame):
    raise Interrupted()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from calibrate.errors import CalibrationError
    from quantize.errors import QuantizeError

    # The default SIGTERM action kills the process on the spot, leaving its partial folder.
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    # SIGINT only where Python's own handler is installed: an ignored SIGINT (a background job)
    # stays ignored, and a caller's handler stays theirs.
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        return COMMANDS[args.command](args)
    except (QuantizeError, CalibrationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)
