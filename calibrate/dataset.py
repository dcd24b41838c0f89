"""The assembled calibration set of all three towers, and its manifest."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from calibrate.audio import audio_features, load_clips
from calibrate.config import CalibrationConfig
from calibrate.errors import CalibrationError
from calibrate.images import load_images, pixel_values
from calibrate.multimodal import build_multimodal
from calibrate.text import load_documents, sample_text

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class CalibrationSet:
    """Model-ready calibration inputs.

    - ``text``: (1, seq_len) int64 input_ids, each starting with <bos>. With ``chat_template``
      a rare sample is a token or two shorter, where re-tokenizing cut text cannot hit seq_len.
    - ``multimodal``: processor outputs for ``model(**sample)`` (input_ids, attention_mask,
      token_type_ids, and pixel_values or input_features + input_features_mask).
    - ``images``: (N, 3, H, W) pixel values from the model's image processor (N may be 0).
    - ``audio``: (input_features (1, T, 128), input_features_mask (1, T)) per clip.
    - ``manifest``: JSON-serialisable record of sources, sample ids and hashes, seed and counts.
    """

    text: list
    multimodal: list[dict]
    images: object
    audio: list[tuple]
    manifest: dict = field(default_factory=dict)


def _parts(processor, label: str):
    """(tokenizer, image_processor, feature_extractor) of a processor; a bare tokenizer works for text."""
    tokenizer = getattr(processor, "tokenizer", None) or processor
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise CalibrationError(label, f"{type(processor).__name__} is neither a processor nor a tokenizer")
    return tokenizer, getattr(processor, "image_processor", None), getattr(processor, "feature_extractor", None)


def build_calibration(config: CalibrationConfig, processor, seed: int) -> CalibrationSet:
    """Read, sample and preprocess calibration data for text, vision and audio, deterministically.

    ``processor`` is the model's ``AutoProcessor`` (Gemma3nProcessor); a tokenizer alone is
    enough when no images, audio or multimodal samples are asked for.
    """
    import torch

    tokenizer, image_processor, feature_extractor = _parts(processor, "calibration")
    n_img, n_aud = config.images.n_samples, config.audio.n_samples
    if n_img and image_processor is None:
        raise CalibrationError(config.images.describe(), f"needs the model's processor with an image processor, got {type(processor).__name__}")
    if n_aud and feature_extractor is None:
        raise CalibrationError(config.audio.describe(), f"needs the model's processor with an audio feature extractor, got {type(processor).__name__}")

    docs, text_manifest = load_documents(config.text)
    text_samples = sample_text(config.text, docs, tokenizer, seed)
    text = [torch.tensor([s.input_ids], dtype=torch.long) for s in text_samples]
    t = config.text
    text_manifest.update(n_samples=t.n_samples, seq_len=t.seq_len, packing=t.packing, chat_template=t.chat_template,
                         samples=[s.manifest() for s in text_samples])
    if t.source == "embedded":
        # The document list is the corpus split; the spans say which documents were used.
        text_manifest.pop("documents", None)

    image_items, image_manifest = load_images(config.images, n_img, seed) if n_img else ([], {"source": None, "items": []})
    images = pixel_values(image_items, image_processor) if image_items else torch.empty(0, 3, 0, 0)
    image_manifest.update(n_samples=n_img, pixel_values_shape=list(images.shape))

    clip_items, audio_manifest = load_clips(config.audio, n_aud, seed) if n_aud else ([], {"source": None, "items": []})
    audio = audio_features(clip_items, feature_extractor) if clip_items else []
    audio_manifest.update(n_samples=n_aud, feature_frames=[int(f.shape[1]) for f, _ in audio])

    multimodal, mm_manifest = build_multimodal(processor, image_items, clip_items, config.multimodal_samples, seed)

    manifest = {
        "version": MANIFEST_VERSION,
        "seed": seed,
        "config": config.model_dump(mode="json"),
        "text": text_manifest,
        "images": image_manifest,
        "audio": audio_manifest,
        "multimodal": mm_manifest,
        "counts": {"text": len(text), "images": int(images.shape[0]), "audio": len(audio), "multimodal": len(multimodal)},
    }
    log.info("calibration set: %s", manifest["counts"])
    return CalibrationSet(text=text, multimodal=multimodal, images=images, audio=audio, manifest=manifest)
