"""The ``calibration:`` section of a recipe: typed, frozen, strict.

Sources:
- ``embedded``: data that ships with Python and the project's dependencies (works offline):
  Python's own documentation topics and standard-library sources for text, scikit-image's
  bundled photographs for images, and the speech clips in ``calibrate/data`` for audio. Its
  ``split`` is ``calib`` by default; ``eval`` is reserved for held-out evaluation.
- ``files``: local files (text: .txt/.jsonl/.parquet/.csv; images: a folder; audio: .wav/.flac).
  ``path`` is a file, a folder or a glob.
- ``hub``: a ``datasets`` hub id with ``name`` (config), ``split`` and ``column`` (needs network
  or the datasets cache). A local folder works too: one ``datasets.load_dataset`` reads (parquet,
  csv, json, imagefolder, audiofolder) or one written by ``Dataset.save_to_disk``.
  ``split`` accepts slices such as ``train[:2000]`` to bound what is read; ``data_files`` picks
  files of very large corpora (c4) so that they are not downloaded whole.
"""
from __future__ import annotations

import os
import re
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SourceKind = Literal["embedded", "files", "hub"]

# The keys each source kind reads. A key set for a source that does not read it is refused: it
# would be accepted and ignored (``{source: embedded, path: my.txt}`` would calibrate on the
# embedded text, ``{source: files, split: test}`` would read every row).
TEXT_SOURCE_KEYS = {"embedded": ("split",), "files": ("path", "column"),
                    "hub": ("dataset", "name", "data_files", "split", "column")}
SOURCE_KEYS = ("path", "dataset", "name", "data_files", "split", "column")  # all of them, in messages' order
# Image folders and audio files have no columns.
MEDIA_SOURCE_KEYS = {**TEXT_SOURCE_KEYS, "files": ("path",)}

# Splits of the embedded data a recipe may calibrate on; ``eval`` is held out for evaluation.
EMBEDDED_CALIBRATION_SPLITS = ("calib", "train")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_VAR = re.compile(r"\$(\w+|\{([^}]*)\})")


def expand_path(value: str | None) -> str | None:
    """``~`` and ``$VAR`` / ``${VAR}`` expanded, as a shell would; the one place where recipe
    paths (and values that may be paths: a model, a dataset folder) are expanded. A variable
    that is not set is an error, not a folder literally named ``$VAR``."""
    if value is None:
        return None
    for m in _VAR.finditer(value):
        if (m.group(2) if m.group(2) is not None else m.group(1)) not in os.environ:
            raise ValueError(f"environment variable {m.group(0)} in {value!r} is not set")
    return os.path.expanduser(os.path.expandvars(value))


def source_error(src, reads: dict[str, tuple[str, ...]]) -> str | None:
    """What is wrong with a data source's keys, or None: ``files`` needs ``path``, ``hub`` needs
    ``dataset``, and no key that the source does not read is set. ``src``: anything with a
    ``source`` attribute and those of the optional keys it has (None: not set); ``reads``: the
    keys each source kind reads. The one check of calibration's sections, the recipe's eval text
    and ``eval``'s own text source."""
    source = src.source
    if source == "files" and not src.path:
        return "source 'files' needs 'path'"
    if source == "hub" and not src.dataset:
        return "source 'hub' needs 'dataset'"
    unread = [k for k in SOURCE_KEYS if getattr(src, k, None) is not None and k not in reads[source]]
    if unread:
        return (f"source {source!r} does not read {', '.join(repr(k) for k in unread)}; "
                f"it reads {', '.join(repr(k) for k in reads[source])}")
    return None


class _Source(_Strict):
    section: ClassVar[str] = "calibration"
    default_column: ClassVar[str] = "text"
    source_keys: ClassVar[dict[str, tuple[str, ...]]] = TEXT_SOURCE_KEYS

    source: SourceKind = "embedded"
    path: str | None = None  # files: a file, a folder or a glob
    dataset: str | None = None  # hub: datasets id (or a local dataset folder)
    name: str | None = None  # hub: datasets config name
    # hub: only these files of the dataset (e.g. c4: "en/c4-train.00000-of-01024.json.gz"), so a
    # huge corpus is not downloaded whole
    data_files: str | list[str] | None = None
    split: str | None = None  # hub: default "train"; embedded: default "calib"
    column: str | None = None  # hub, and text's jsonl/parquet/csv files: default per modality

    @field_validator("path", "dataset")
    @classmethod
    def _expand(cls, v):
        return expand_path(v)

    @model_validator(mode="after")
    def _needs(self):
        error = source_error(self, self.source_keys)
        if error:
            raise ValueError(error)
        if self.source == "embedded" and self.split is not None and self.split not in EMBEDDED_CALIBRATION_SPLITS:
            raise ValueError(
                f"embedded split {self.split!r} cannot be used for calibration; valid: "
                f"{', '.join(EMBEDDED_CALIBRATION_SPLITS)} ('eval' is held out for evaluation)"
            )
        return self

    @property
    def resolved_split(self) -> str:
        if self.split is not None:
            return self.split
        return "calib" if self.source == "embedded" else "train"

    @property
    def resolved_column(self) -> str:
        return self.column or self.default_column

    def describe(self) -> str:
        """Label used in errors and logs: section plus where the data comes from."""
        if self.source == "embedded":
            where = f"embedded, split {self.resolved_split}"
        elif self.source == "files":
            where = f"files: {self.path}"
        else:
            cfg = f", config {self.name}" if self.name else ""
            files = f", data_files {self.data_files}" if self.data_files else ""
            where = f"hub: {self.dataset}{cfg}{files}, split {self.resolved_split}"
        return f"{self.section} ({where})"


class TextCalibration(_Source):
    section: ClassVar[str] = "calibration.text"
    default_column: ClassVar[str] = "text"

    n_samples: int = Field(32, ge=1)
    seq_len: int = Field(256, ge=8)
    packing: bool = True  # concatenate documents and cut windows; else one window per document
    chat_template: bool = False  # wrap each sample as a user turn in the model's chat template


class ImageCalibration(_Source):
    section: ClassVar[str] = "calibration.images"
    default_column: ClassVar[str] = "image"
    source_keys: ClassVar[dict[str, tuple[str, ...]]] = MEDIA_SOURCE_KEYS

    n_samples: int = Field(4, ge=0)


class AudioCalibration(_Source):
    section: ClassVar[str] = "calibration.audio"
    default_column: ClassVar[str] = "audio"
    source_keys: ClassVar[dict[str, tuple[str, ...]]] = MEDIA_SOURCE_KEYS

    n_samples: int = Field(4, ge=0)
    max_seconds: float = Field(10.0, gt=0)  # longer clips are cut to their first max_seconds


class CalibrationConfig(_Strict):
    text: TextCalibration = TextCalibration()
    images: ImageCalibration = ImageCalibration()
    audio: AudioCalibration = AudioCalibration()
    # Samples that put an image or audio clip inside a chat prompt, so the text decoder also sees
    # the towers' soft tokens during calibration. They alternate image, audio, image, ... over
    # the modalities whose sources are set, reusing the calibration images and clips.
    multimodal_samples: int = Field(0, ge=0)
