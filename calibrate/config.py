"""The ``calibration:`` section of a recipe: typed, frozen, strict.

Sources:
- ``embedded``: data that ships with Python and the project's dependencies (works offline).
- ``files``: local files (text: .txt/.jsonl/.parquet/.csv; images: a folder; audio: .wav/.flac).
- ``hub``: a ``datasets`` hub id with ``name`` (config), ``split`` and ``column`` (needs network
  or the datasets cache).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SourceKind = Literal["embedded", "files", "hub"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Source(_Strict):
    source: SourceKind = "embedded"
    path: str | None = None  # files: a file, a folder or a glob
    dataset: str | None = None  # hub: datasets id
    name: str | None = None  # hub: datasets config name
    split: str = "train"
    column: str | None = None

    @model_validator(mode="after")
    def _needs(self):
        if self.source == "files" and not self.path:
            raise ValueError("source 'files' needs 'path'")
        if self.source == "hub" and not self.dataset:
            raise ValueError("source 'hub' needs 'dataset' (and usually 'column')")
        return self


class TextCalibration(_Source):
    n_samples: int = Field(32, ge=1)
    seq_len: int = Field(256, ge=8)
    packing: bool = True  # concatenate documents and cut windows; else one window per document
    chat_template: bool = False  # wrap each sample as a user turn in the model's chat template


class ImageCalibration(_Source):
    n_samples: int = Field(4, ge=0)


class AudioCalibration(_Source):
    n_samples: int = Field(4, ge=0)
    max_seconds: float = Field(10.0, gt=0)


class CalibrationConfig(_Strict):
    text: TextCalibration = TextCalibration()
    images: ImageCalibration = ImageCalibration()
    audio: AudioCalibration = AudioCalibration()
    # Samples that put an image or audio clip inside a chat prompt, so the text decoder also sees
    # the towers' soft tokens during calibration.
    multimodal_samples: int = Field(0, ge=0)
