"""Mixed calibration samples: an image or a speech clip inside a chat prompt.

They make the text decoder see the vision and audio towers' soft tokens during calibration.
Each sample is the processor's own output for the model's own chat template, ready for
``model(**sample)``.
"""
from __future__ import annotations

import logging
import random

from calibrate.errors import CalibrationError
from calibrate.text import ids_sha256

log = logging.getLogger(__name__)

LABEL = "calibration.multimodal_samples"

IMAGE_PROMPTS = (
    "Describe this image in detail.",
    "What is shown in this picture?",
    "List the objects you can see in this image.",
    "Write a short caption for this photo.",
)
AUDIO_PROMPTS = (
    "Transcribe this audio clip.",
    "What is being said in this recording?",
    "Summarise what the speaker says.",
    "Write down the spoken words.",
)


def render_prompt(processor, kind: str, prompt: str) -> str:
    """One user turn holding a ``kind`` ("image" or "audio") item and ``prompt``, as chat text.

    The processor expands its placeholder (``processor.image_token`` / ``audio_token``) into the
    soft-token block. Google's Gemma 3n template renders media items as that placeholder; a
    template that renders something else gets the placeholder as a text item instead (logged),
    which gives the identical string under Google's template.
    """
    placeholder = processor.image_token if kind == "image" else processor.audio_token
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(placeholder) != 1:
        log.warning("the chat template does not render %s items as %r; inserting the placeholder as text", kind, placeholder)
        messages = [{"role": "user", "content": [{"type": "text", "text": placeholder}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(placeholder) != 1:
            raise CalibrationError(LABEL, f"the processor's chat template drops the {kind} placeholder {placeholder!r}")
    return text


def processor_inputs(processor, text: str, image=None, waveform=None) -> dict:
    """``processor(text=..., images=... | audio=...)`` as a plain dict of (1, ...) tensors."""
    bos = processor.tokenizer.bos_token
    kwargs = {"images": [image]} if image is not None else {"audio": [waveform]}
    # The chat template already wrote <bos>; the tokenizer must not add a second one.
    out = processor(text=[text], add_special_tokens=not (bos and text.startswith(bos)), return_tensors="pt", **kwargs)
    return dict(out.items())


def build_multimodal(processor, images: list, clips: list, n: int, seed: int) -> tuple[list[dict], dict]:
    """``n`` samples alternating over the modalities present (image, audio, image, ...)."""
    if n == 0:
        return [], {"n_samples": 0, "samples": []}
    kinds = [k for k, pool in (("image", images), ("audio", clips)) if pool]
    if not kinds:
        raise CalibrationError(LABEL, f"{n} multimodal samples need calibration images or audio; "
                                      "set calibration.images.n_samples or calibration.audio.n_samples above 0")
    for attr in ("image_token", "audio_token", "tokenizer"):
        if not hasattr(processor, attr):
            raise CalibrationError(LABEL, f"the processor ({type(processor).__name__}) has no {attr}; a Gemma 3n processor is needed")
    rng = random.Random(seed)
    orders = {"image": rng.sample(range(len(images)), len(images)), "audio": rng.sample(range(len(clips)), len(clips))}
    samples, records = [], []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        round_ = i // len(kinds)
        if kind == "image":
            item = images[orders["image"][round_ % len(images)]]
            prompt = rng.choice(IMAGE_PROMPTS)
            sample = processor_inputs(processor, render_prompt(processor, kind, prompt), image=item.image)
        else:
            item = clips[orders["audio"][round_ % len(clips)]]
            prompt = rng.choice(AUDIO_PROMPTS)
            sample = processor_inputs(processor, render_prompt(processor, kind, prompt), waveform=item.waveform)
        samples.append(sample)
        records.append({"kind": kind, "item": item.id, "item_sha256": item.sha256, "prompt": prompt,
                        "n_tokens": int(sample["input_ids"].shape[-1]), "input_ids_sha256": ids_sha256(sample["input_ids"][0].tolist())})
    log.info("%s: %d samples (%s)", LABEL, n, ", ".join(kinds))
    return samples, {"n_samples": n, "samples": records}
