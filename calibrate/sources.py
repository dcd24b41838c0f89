"""Where calibration data is read from: local file lists and ``datasets`` splits, with clear errors."""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import random
from pathlib import Path

from calibrate.errors import CalibrationError

log = logging.getLogger(__name__)


def list_files(path: str, extensions: tuple[str, ...], label: str) -> list[Path]:
    """Files under ``path`` (a file, a folder searched recursively, or a glob) with a listed extension.

    Sorted by path so that sampling with a seed picks the same files on every machine.
    """
    exts = tuple(e.lower() for e in extensions)
    p = Path(path).expanduser()
    if p.is_file():
        candidates = [p]
    elif p.is_dir():
        candidates = [q for q in p.rglob("*") if q.is_file()]
    elif any(ch in path for ch in "*?["):
        candidates = [Path(q) for q in glob.glob(os.path.expanduser(path), recursive=True) if Path(q).is_file()]
    else:
        raise CalibrationError(label, f"path {path!r} does not exist")
    files = sorted(q for q in candidates if q.suffix.lower() in exts)
    if not files:
        what = "folder" if p.is_dir() else "file" if p.is_file() else "glob"
        raise CalibrationError(label, f"{what} {path!r} holds no files with extension {', '.join(exts)}")
    return files


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _offline() -> bool:
    env = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in env):
        return True
    try:
        import datasets

        return bool(datasets.config.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE)
    except (ImportError, AttributeError):
        return False


def _looks_like_network_error(err: BaseException) -> bool:
    names = {c.__name__ for c in type(err).__mro__}
    network = {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "Timeout", "HTTPError"}
    return bool(names & network) or "offline" in str(err).lower()


def load_hub_split(dataset: str, name: str | None, split: str, label: str, data_files=None):
    """One split of a ``datasets`` dataset as a ``datasets.Dataset``.

    ``dataset`` is a hub id, a folder ``load_dataset`` understands, or a folder written by
    ``save_to_disk``. A dataset that is not cached while the machine is offline gets an error
    that says so, instead of datasets' connection traceback.
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise CalibrationError(label, "the 'datasets' package is needed for source 'hub'") from e

    local = Path(dataset).expanduser()
    saved = local.is_dir() and any((local / f).exists() for f in ("state.json", "dataset_dict.json"))
    try:
        if saved:
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise CalibrationError(label, f"dataset folder {dataset!r} has no split {split!r}; valid: {', '.join(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(dataset, name, split=split, data_files=data_files)
    except CalibrationError:
        raise
    except Exception as e:  # datasets raises many unrelated types; all mean "cannot read it"
        first = (str(e).strip().splitlines() or [""])[0]
        if _offline() or _looks_like_network_error(e):
            raise CalibrationError(
                label,
                f"dataset {dataset!r} (config {name!r}, split {split!r}) is not in the local datasets cache "
                f"and the hub cannot be reached (offline: {_offline()}); download it once while online, "
                f"point 'dataset' at a local folder, or use source 'files' or 'embedded' ({type(e).__name__}: {first})",
            ) from e
        raise CalibrationError(label, f"cannot load dataset {dataset!r} (config {name!r}, split {split!r}): {type(e).__name__}: {first}") from e
    if isinstance(ds, datasets.IterableDataset):  # pragma: no cover - load_dataset without streaming
        raise CalibrationError(label, "streaming datasets are not supported; use a split slice such as 'train[:2000]'")
    log.info("%s: %d rows", label, ds.num_rows)
    return ds


def check_column(ds, column: str, label: str) -> None:
    if column not in ds.column_names:
        raise CalibrationError(label, f"has no column {column!r}; columns: {', '.join(ds.column_names)}")


def hub_manifest(ds, dataset: str, name: str | None, split: str, column: str, data_files=None) -> dict:
    """What identifies a hub split: id, config, split, column and datasets' content fingerprint."""
    return {
        "dataset": dataset,
        "name": name,
        "split": split,
        "data_files": data_files,
        "column": column,
        "num_rows": ds.num_rows,
        "fingerprint": getattr(ds, "_fingerprint", None),
    }


def pick_indices(n_items: int, n: int, rng: random.Random, label: str, what: str) -> list[int]:
    """``n`` distinct indices out of ``n_items``, sorted, drawn with ``rng``; too few items is an error."""
    if n > n_items:
        raise CalibrationError(label, f"n_samples is {n} but the source holds only {n_items} {what}")
    return sorted(rng.sample(range(n_items), n))


def undecoded_column(ds, column: str, feature: str):
    """The dataset with ``column`` left as raw bytes/paths, so that we decode (and report) each cell."""
    import datasets

    kind = type(ds.features[column]).__name__
    if kind == feature:
        return ds.cast_column(column, getattr(datasets, feature)(decode=False))
    return ds


def cell_bytes(cell, where: str) -> bytes:
    """Encoded bytes of a dataset cell: {'bytes', 'path'} (undecoded Image/Audio), raw bytes or a path."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        cell = cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, str) and cell:
        try:
            return Path(cell).read_bytes()
        except OSError as e:
            raise CalibrationError(where, f"cannot read {cell!r} ({e.strerror})") from None
    raise CalibrationError(where, f"holds {type(cell).__name__}, not an image or audio file")
