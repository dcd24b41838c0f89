"""Command line: ``python -m eval run ...`` and ``python -m eval report ...``.

Thin: parses arguments, configures logging, calls ``eval.run`` / ``eval.report``; an
``EvalError`` becomes a one-line message and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

from eval.backends import DEVICE_HELP, parse_device
from eval.errors import EvalError

log = logging.getLogger("eval")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _device(text: str) -> str:
    try:
        parse_device(text)
    except EvalError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def _text_source(args):
    from eval.heldout import TextSource

    if args.dataset is None and (args.dataset_config or args.split):
        raise EvalError("--dataset-config and --split need --dataset")
    if args.text is not None:
        return TextSource("files", path=args.text, column=args.column)
    if args.dataset is not None:
        return TextSource("hub", dataset=args.dataset, name=args.dataset_config, split=args.split, column=args.column)
    if args.column:
        raise EvalError("--column needs --text or --dataset")
    return TextSource()


# the timing flags (with --latency only) and the RunSettings fields they set
_LATENCY_FLAGS = {"prompt_lengths": "prompt_lengths", "decode_tokens": "n_decode", "repeats": "repeats", "warmup": "warmup"}


def _latency_settings(args) -> dict:
    """The timing flags given, as RunSettings fields (the rest keep RunSettings' defaults); given
    without --latency they would be ignored, so they fail."""
    given = {k: getattr(args, k) for k in _LATENCY_FLAGS if getattr(args, k) is not None}
    if given and not args.latency:
        raise EvalError(f"{', '.join('--' + k.replace('_', '-') for k in given)} go with --latency")
    return {_LATENCY_FLAGS[k]: v for k, v in given.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="evaluate artifacts (model folders or .gguf files) against a reference")
    r.add_argument("artifacts", nargs="+", help="safetensors model folders and/or .gguf files")
    r.add_argument("--reference", required=True,
                   help="the unquantized model: a folder, or a hub id read from the hub cache (also gives the tokenizer)")
    r.add_argument("--backend", default="auto", choices=["auto", "transformers", "llamacpp"],
                   help="auto: llamacpp for .gguf, transformers for folders")
    r.add_argument("--device", default="cpu", type=_device, help=DEVICE_HELP)
    t = r.add_mutually_exclusive_group()
    t.add_argument("--text", metavar="PATH",
                   help="score this text instead of the embedded held-out split: a .txt/.jsonl/.parquet/.csv file, a folder or a glob")
    t.add_argument("--dataset", metavar="ID", help="score a datasets split (hub id from the datasets cache, or a local dataset folder)")
    r.add_argument("--dataset-config", metavar="NAME", help="with --dataset: its config name (e.g. wikitext-2-raw-v1)")
    r.add_argument("--split", help="with --dataset: the split (default test; slices such as test[:500] work)")
    r.add_argument("--column", help="with --dataset, or .jsonl/.parquet/.csv files: the text column (default text)")
    r.add_argument("--out", required=True, help="results folder (one JSON per artifact and device; KL base cached here)")
    r.add_argument("--threads", type=int, default=None, help="CPU threads (torch and llama.cpp)")
    r.add_argument("--seq-len", type=int, default=512, help="window length in tokens (second half scored)")
    r.add_argument("--n-windows", type=int, default=4)
    r.add_argument("--kl-top-k", type=int, default=32, help="reference log-probs kept per token; 0 = all")
    r.add_argument("--kl-base", default=None, help="KL base file to use or create (default: in --out)")
    r.add_argument("--latency", action="store_true", help="also time prefill and decode")
    # with --latency only; None: not given (RunSettings' default), so one without --latency is refused
    r.add_argument("--prompt-lengths", type=_ints, default=None, help="with --latency")
    r.add_argument("--decode-tokens", type=int, default=None, help="with --latency")
    r.add_argument("--repeats", type=int, default=None, help="with --latency")
    r.add_argument("--warmup", type=int, default=None, help="with --latency")
    r.add_argument("--towers", action="store_true", help="also compare vision/audio tower embeddings")

    rep = sub.add_parser("report", help="markdown table and HTML page from results files")
    rep.add_argument("results", nargs="+", help="results JSON files or folders")
    rep.add_argument("--out", required=True, help="folder for report.md and report.html")
    rep.add_argument("--baseline", default=None,
                     help="result name to compare every other result with (same device), or a results file/folder of an earlier run")
    rep.add_argument("--max-ppl-increase", type=float, default=0.02, help="relative ppl increase flagged (0.02 = 2%%)")
    rep.add_argument("--max-kl-increase", type=float, default=0.10, help="relative KL increase flagged")
    rep.add_argument("--max-slowdown", type=float, default=0.10, help="relative tokens/s decrease flagged")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            from eval.reference import resolve_reference
            from eval.run import RunSettings, describe, evaluate_many

            settings = RunSettings(
                seq_len=args.seq_len, n_windows=args.n_windows, kl_top_k=args.kl_top_k, threads=args.threads,
                device=args.device, latency=args.latency, towers=args.towers, text=_text_source(args),
                **_latency_settings(args),
            )
            reference = resolve_reference(args.reference)
            paths = evaluate_many(args.artifacts, reference, args.out, args.backend, settings, args.kl_base)
            for p in paths:
                print(f"{describe(p)}  -> {p}")
        else:
            from eval.report import Thresholds, write_report

            md, html, flags = write_report(args.results, args.out, args.baseline,
                                           Thresholds(args.max_ppl_increase, args.max_kl_increase, args.max_slowdown))
            print(f"wrote {md} and {html}; {len(flags)} regression(s) flagged")
            for f in flags:
                print(f"REGRESSION {f}")
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
