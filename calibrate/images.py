"""Image calibration data: photographs from a folder, a dataset column or scikit-image's samples.

Images become pixel values through the model's own image processor, never a re-implementation.
"""
from __future__ import annotations

import hashlib
import io
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from calibrate.config import ImageCalibration
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

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Photographs bundled inside the scikit-image wheel (``skimage/data``; no download). The split
# is fixed by name so calibration and evaluation never share an image. coins and moon are
# grayscale photographs (converted to RGB like any other grayscale input).
EMBEDDED_IMAGES = {
    "calib": ("astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "ihc.png",
              "coins.png", "moon.png"),
    "train": (),
    "eval": ("chelsea.png", "retina.jpg", "camera.png"),
}


@dataclass(frozen=True)
class ImageItem:
    id: str
    sha256: str  # of the encoded file bytes
    image: object  # PIL.Image.Image in RGB

    def manifest(self) -> dict:
        return {"id": self.id, "sha256": self.sha256, "size": list(self.image.size)}


def decode_image(data: bytes, where: str) -> object:
    """RGB PIL image from encoded bytes; unreadable data raises CalibrationError naming ``where``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise CalibrationError(where, "unreadable image (not a format Pillow recognises)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise CalibrationError(where, f"unreadable image ({type(e).__name__}: {e})") from None


def _read_file(path: Path, label: str, item_id: str) -> ImageItem:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CalibrationError(f"{label}: {path}", f"cannot be read ({e.strerror})") from None
    return ImageItem(item_id, hashlib.sha256(data).hexdigest(), decode_image(data, f"{label}: {path}"))


def skimage_data_dir(label: str) -> Path:
    try:
        import skimage.data
    except ImportError as e:
        raise CalibrationError(label, "the embedded images ship with scikit-image; install scikit-image") from e
    return Path(skimage.data.__file__).parent


def embedded_images(split: str, label: str | None = None) -> list[ImageItem]:
    label = label or f"embedded images (split {split})"
    names = EMBEDDED_IMAGES.get(split)
    if not names:
        raise CalibrationError(label, f"the embedded images have no photographs in split {split!r}; "
                                      f"splits with images: calib, eval")
    folder = skimage_data_dir(label)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CalibrationError(label, f"scikit-image's bundled images {', '.join(missing)} are missing from {folder}")
    return [_read_file(folder / n, label, f"skimage:{n}") for n in names]



def load_images(src: ImageCalibration, n: int, seed: int) -> tuple[list[ImageItem], dict]:
    """``n`` images of the source, chosen with ``seed``, and the source's manifest."""
    label = src.describe()
    rng = random.Random(seed)
    if src.source == "embedded":
        pool = embedded_images(src.resolved_split, label)
        items = [pool[i] for i in pick_indices(len(pool), n, rng, label, "images")]
        manifest = {"source": "embedded", "collection": "scikit-image sample photographs", "split": src.resolved_split}
    elif src.source == "files":
        files = list_files(src.path, IMAGE_EXTENSIONS, label)
        items = [_read_file(files[i], label, str(files[i])) for i in pick_indices(len(files), n, rng, label, "image files")]
        manifest = {"source": "files", "path": src.path, "n_files": len(files)}
    else:
        split, column = src.resolved_split, src.resolved_column
        ds = load_hub_split(src.dataset, src.name, split, label, src.data_files)
        check_column(ds, column, label)
        ds = undecoded_column(ds, column, "Image")
        rows = pick_indices(ds.num_rows, n, rng, label, "rows")
        items = []
        for r in rows:
            data = cell_bytes(ds[r][column], f"{label}: column {column!r} row {r}")
            items.append(ImageItem(f"row:{r}", hashlib.sha256(data).hexdigest(), decode_image(data, f"{label}: column {column!r} row {r}")))
        manifest = {"source": "hub", **hub_manifest(ds, src.dataset, src.name, split, column, src.data_files)}
    manifest["items"] = [it.manifest() for it in items]
    return items, manifest




def pixel_values(items: list[ImageItem], image_processor):
    """(N, 3, H, W) pixel values from the model's own image processor."""
    import torch

    if not items:
        return torch.empty(0)
    return image_processor(images=[it.image for it in items], return_tensors="pt")["pixel_values"]
