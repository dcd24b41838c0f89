"""Thin command line: parse arguments, call the library, map its exceptions to exit codes.

Exit codes: 0 success; 2 bad input (recipe, model, data, request), one line on stderr;
1 an unexpected failure (traceback); 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
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
    r.add_argument("--allow-pickle", action="store_true", help="accept pickle checkpoints (they can run code)")
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
    return p


def _cmd_run(args) -> int:
    from quantize.pipeline import run
    from quantize.plan import format_plan
    from quantize.recipe import load_recipe

    recipe = load_recipe(args.recipe, model=args.model, output=args.out, device=args.device)
    if args.force and recipe.exports.gguf is not None:
        gguf = recipe.exports.gguf.model_copy(update={"force": True})
        recipe = recipe.model_copy(update={"exports": recipe.exports.model_copy(update={"gguf": gguf})})
    result = run(recipe, dry_run=args.dry_run, allow_pickle=args.allow_pickle)
    if args.dry_run:
        if args.json:
            print(json.dumps(result.plan.to_json(), indent=2))
        else:
            print(format_plan(result.plan))
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


COMMANDS = {"run": _cmd_run, "make-tiny": _cmd_make_tiny, "inspect": _cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from calibrate.errors import CalibrationError
    from quantize.errors import QuantizeError

    try:
        return COMMANDS[args.command](args)
    except (QuantizeError, CalibrationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
