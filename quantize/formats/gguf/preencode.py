"""Text GGUF tensors encoded while the calibration runs, on one thread at the lowest priority.

The calibration keeps the cores busy with GEMMs but leaves gaps (GPTQ's column loops are
thousands of small steps on one core). E4B's per-layer table is 262144 x 8960 values; ggml's
plain Q6_K, Q3_K and Q2_K take about 32, 13 and 62 ns per value per core on an AVX512 EPYC
(bench/results/kquant_speed.md): up to a minute or more of the export on 2 cores. Its bytes do
not depend on the calibration: no statistics are ever collected for the embedding tables
(``PREENCODED_TOWERS``). The compiled Q4_K / Q5_K (``kquant_kernels``, recipes/int4.yaml's
table) are left to the export: beside the 35-layer calibration they cost it more than they saved
the export (``eligible``).
So ``PreEncoder`` packs such targets during the calibration with the writer's own functions
(``writer.pieces`` / ``writer.pack_piece``: the same pieces, the same bytes), piece by piece
into a file each, on a ``quantize.background.LowPriorityTask`` (nice 19: it takes a core mostly
when the calibration leaves one idle, not only then: on 2 E4B-shaped layers the calibration
took 3-5 s longer beside it and the export 7-8 s less, README). When the GGUF writer reaches such a target it stops the
work (the piece under way finishes), copies the finished pieces and packs only the rest
(``writer.Resume``): never a wait, at worst no gain.

The writer takes pre-encoded pieces only for a target the final plan has unchanged, whose source
the calibration left alone (not computed ahead, not rescaled or replaced, no importance): then
they are byte for byte what it would pack itself. Imports: numpy and ``quantize`` only.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantize.background import LowPriorityTask
from quantize.errors import ExportError
from quantize.formats.gguf import blocks, kquants
from quantize.formats.gguf.writer import Resume, Target, pack_piece, pieces, plan_text

log = logging.getLogger(__name__)

# Towers no calibration collects statistics for or changes (quantize.sequential covers the text
# decoder, quantize.tower_stats the vision and audio towers).
PREENCODED_TOWERS = ("token_embeddings", "per_layer_embeddings")
COPY_BYTES = 1 << 24
# A piece (writer.STREAM_ELEMENTS values) is packed here in slices of this many values: 4 MiB of
# fp32 at a time instead of 32, so the background's working set leaves the shared L3 cache to
# the calibration (with whole pieces the 2-layer E4B-shaped calibration ran 4-9 s slower).
SLICE_ELEMENTS = 1 << 20


def eligible(ctx, t: Target) -> bool:
    """Whether ``t``'s bytes are known before the calibration and worth encoding ahead: one
    source in ``PREENCODED_TOWERS``, encoded from its float rows (not our codes, which the
    writer only packs) by ggml's plain K-quant code, streamed in several pieces. Q8_0 and Q4_0
    (numpy) and the compiled K-quants (``kquants.compiled``) are not: beside the calibration
    they cost it more than they save the export (35 E4B-shaped layers, README). Nor is a source
    with importance: ``take`` never uses such pieces."""
    if len(t.sources) != 1 or t.choice.exact or t.dequantize:
        return False
    src = t.sources[0]
    if ctx.source.plan[src].tower not in PREENCODED_TOWERS or src in ctx.source.importance:
        return False
    if t.choice.qtype not in kquants.BYTES or kquants.compiled(t.choice.qtype, weighted=False):
        return False
    return len(pieces(ctx, t)) > 1


@dataclass
class _Progress:
    target: Target
    path: Path
    pieces: int = 0
    rows: int = 0
    first: np.ndarray | None = None


@dataclass(frozen=True)
class Taken:
    """The finished pieces of one target: the first ``nbytes`` bytes of ``path``."""

    path: Path
    nbytes: int
    resume: Resume

    def copy_to(self, fout) -> int:
        left = self.nbytes
        with open(self.path, "rb") as f:
            while left:
                buf = f.read(min(left, COPY_BYTES))
                if not buf:
                    raise ExportError(f"{self.path}: ends {left} bytes before the pieces encoded into it")
                fout.write(buf)
                left -= len(buf)
        return self.nbytes


class PreEncoder:
    """The eligible targets of ``options``' text GGUF, encoded into files in ``folder`` (which
    the caller owns and removes). ``ctx``: an export context before the calibration (a
    ``TensorSource`` with nothing computed ahead)."""

    def __init__(self, ctx, options, folder: str | Path):
        self.ctx = ctx
        self.folder = Path(folder)
        targets = [t for t in plan_text(ctx, options).targets if eligible(ctx, t)]
        targets.sort(key=lambda t: -t.rows * t.cols)  # the largest first
        self._progress = {t.gguf: _Progress(t, self.folder / f"{i:03d}.bin") for i, t in enumerate(targets)}
        self._task: LowPriorityTask | None = None

    @property
    def targets(self) -> list[Target]:
        return [p.target for p in self._progress.values()]

    def start(self) -> bool:
        """Starts the background work; False (and nothing started) when no target is eligible."""
        if not self._progress:
            return False
        self.folder.mkdir()
        self._task = LowPriorityTask("gguf-preencode", self.encode)
        return True

    def encode(self, stop: threading.Event, limit: int | None = None) -> int:
        """Packs the targets' next pieces into their files, in order, until ``stop`` is set
        (asked before each piece) or ``limit`` more pieces are done; returns how many were.
        The background thread's work; called directly it continues where the last call ended."""
        n = 0
        for p in self._progress.values():
            todo = pieces(self.ctx, p.target)[p.pieces:]
            if not todo:
                continue
            info = self.ctx.source.checkpoint.tensors[p.target.sources[0]]
            step = max(1, SLICE_ELEMENTS // (info.numel // info.shape[0]))
            with open(p.path, "ab") as f:
                for src, (r0, r1) in todo:  # eligible targets are streamed: every piece is a row range
                    if stop.is_set() or (limit is not None and n >= limit):
                        return n
                    for a in range(r0, r1, step):  # rows are packed independently: the piece's bytes
                        part = pack_piece(self.ctx, p.target, src, (a, min(a + step, r1)), background=True)
                        f.write(np.ascontiguousarray(part).data)
                        if p.first is None:
                            p.first = part[:1].copy()
                        p.rows += part.shape[0]
                    p.pieces += 1
                    n += 1
        return n

    def stop(self) -> None:
        """Ends the background work (the piece under way finishes first); idempotent. An error it
        met is not raised here: the writer packs those pieces itself and meets it there."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def take(self, t: Target, source) -> Taken | None:
        """What was pre-encoded of the final plan's target ``t`` (``source``: the final
        ``TensorSource``), or None where nothing was or it no longer applies. Stops the work:
        the writer now has the cores."""
        self.stop()
        p = self._progress.get(t.gguf)
        if p is None or p.pieces == 0 or p.target != t:
            return None
        src = t.sources[0]
        if src in source.precomputed or source.changed(src) or src in source.importance or not source.row_streamable(src):
            return None
        log.info("%s: %d of %d pieces encoded during the calibration", t.gguf, p.pieces, len(pieces(self.ctx, t)))
        return Taken(p.path, p.rows * blocks.row_bytes(t.choice.qtype, t.cols), Resume(p.pieces, p.rows, p.first))
