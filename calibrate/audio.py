"""Audio calibration data: speech clips from files, a dataset column or the clips in ``calibrate/data``.

Clips are read with soundfile, mixed to mono, resampled to 16 kHz with scipy's polyphase filter
(deterministic), cut to ``max_seconds`` and turned into mel features by the model's own feature
extractor.
"""
from __future__ import annotations

import hashlib
import io
import logging
import random
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np

from calibrate.config import AudioCalibration
from calibrate.errors import CalibrationError
from calibrate.sources import (
    cell_bytes,
    check_column,
    hub_manifest,
    list_files,
    load_hub_split,
    pick_indices,
    undecoded_column,
)

log = logging.getLogger(__name__)

SAMPLING_RATE = 16_000  # what Gemma 3n's audio feature extractor expects
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class ClipItem:
    id: str
    sha256: str  # of the encoded file bytes
    waveform: np.ndarray  # float32 mono at SAMPLING_RATE
    source_rate: int  # sampling rate of the file before resampling

    @property
    def seconds(self) -> float:
        return len(self.waveform) / SAMPLING_RATE

    def manifest(self) -> dict:
        return {"id": self.id, "sha256": self.sha256, "seconds": round(self.seconds, 4), "source_rate": self.source_rate}


def resample(waveform: np.ndarray, rate: int, target: int = SAMPLING_RATE) -> np.ndarray:
    """Polyphase resampling (scipy.signal.resample_poly) from ``rate`` to ``target``; float32 out."""
    if rate == target:
        return np.asarray(waveform, dtype=np.float32)
    from scipy.signal import resample_poly

    g = gcd(int(rate), int(target))
    return resample_poly(np.asarray(waveform, dtype=np.float64), target // g, rate // g).astype(np.float32)


def decode_audio(data: bytes, where: str, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """(mono float32 waveform at 16 kHz, the file's own rate); unreadable data names ``where``."""
    import soundfile as sf

    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        # LibsndfileError's own text names the BytesIO object; its error_string says what failed.
        reason = getattr(e, "error_string", None) or str(e)
        raise CalibrationError(where, f"unreadable audio ({reason.rstrip('.')}; readable: wav, flac, ogg)") from None
    if wave.shape[0] == 0:
        raise CalibrationError(where, "audio file holds no samples")
    if max_seconds is not None:
        wave = wave[: int(round(max_seconds * rate))]
    return resample(wave.mean(axis=1), rate), int(rate)


def _read_file(path: Path, label: str, item_id: str, max_seconds: float | None) -> ClipItem:
    where = f"{label}: {path}"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CalibrationError(where, f"cannot be read ({e.strerror})") from None
    wave, rate = decode_audio(data, where, max_seconds)
    return ClipItem(item_id, hashlib.sha256(data).hexdigest(), wave, rate)


def embedded_clips(split: str, label: str | None = None, max_seconds: float | None = None) -> list[ClipItem]:
    """The shipped speech clips of one split (``speech_<split>_<n>.wav``; see data/README.md)."""
    label = label or f"embedded audio (split {split})"
    files = sorted(DATA_DIR.glob(f"speech_{split}_*.wav"))
    if not files:
        raise CalibrationError(label, f"no embedded speech clips for split {split!r} in {DATA_DIR}; splits with clips: calib, eval")
    return [_read_file(f, label, f"embedded:{f.name}", max_seconds) for f in files]


def load_clips(src: AudioCalibration, n: int, seed: int) -> tuple[list[ClipItem], dict]:
    """``n`` clips of the source, chosen with ``seed``, and the source's manifest."""
    label = src.describe()
    rng = random.Random(seed)
    if src.source == "embedded":
        pool = embedded_clips(src.resolved_split, label, src.max_seconds)
        items = [pool[i] for i in pick_indices(len(pool), n, rng, label, "clips")]
        manifest = {"source": "embedded", "collection": "espeak-ng speech clips in calibrate/data", "split": src.resolved_split}
    elif src.source == "files":
        files = list_files(src.path, AUDIO_EXTENSIONS, label)
        items = [_read_file(files[i], label, str(files[i]), src.max_seconds) for i in pick_indices(len(files), n, rng, label, "audio files")]
        manifest = {"source": "files", "path": src.path, "n_files": len(files)}
    else:
        split, column = src.resolved_split, src.resolved_column
        ds = load_hub_split(src.dataset, src.name, split, label, src.data_files)
        check_column(ds, column, label)
        ds = undecoded_column(ds, column, "Audio")
        items = []
        for r in pick_indices(ds.num_rows, n, rng, label, "rows"):
            where = f"{label}: column {column!r} row {r}"
            data = cell_bytes(ds[r][column], where)
            wave, rate = decode_audio(data, where, src.max_seconds)
            items.append(ClipItem(f"row:{r}", hashlib.sha256(data).hexdigest(), wave, rate))
        manifest = {"source": "hub", **hub_manifest(ds, src.dataset, src.name, split, column, src.data_files)}
    manifest["max_seconds"] = src.max_seconds
    manifest["items"] = [it.manifest() for it in items]
    return items, manifest


def audio_features(items: list[ClipItem], feature_extractor) -> list[tuple]:
    """(input_features (1, T, 128), input_features_mask (1, T)) per clip, from the model's extractor."""
    rate = getattr(feature_extractor, "sampling_rate", SAMPLING_RATE)
    if rate != SAMPLING_RATE:
        raise CalibrationError("calibration.audio", f"the feature extractor expects {rate} Hz; clips are resampled to {SAMPLING_RATE} Hz")
    out = []
    for it in items:
        f = feature_extractor(it.waveform, return_tensors="pt")
        out.append((f["input_features"], f["input_features_mask"]))
    return out
