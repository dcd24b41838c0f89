"""Mixed multimodal calibration samples: processor outputs that run through Gemma 3n's towers."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from calibrate import build_calibration
from calibrate.config import CalibrationConfig
from calibrate.multimodal import render_prompt

# The media-item part of Google's Gemma 3n chat template (google/gemma-3n-E4B-it): image and
# audio items render as the processor's placeholders.
GEMMA3N_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{{ '<start_of_turn>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'audio' -%}{{ '<audio_soft_token>' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image_soft_token>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def config(n_multimodal: int) -> CalibrationConfig:
    return CalibrationConfig(
        text={"n_samples": 1, "seq_len": 32}, images={"n_samples": 1}, audio={"n_samples": 1},
        multimodal_samples=n_multimodal,
    )


@pytest.fixture(scope="module")
def processor(tiny_random):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_random))


def test_samples_equal_the_processor_output_for_the_gemma3n_prompt(processor):
    cs = build_calibration(config(3), processor, seed=0)
    tok = processor.tokenizer
    mm = cs.manifest["multimodal"]["samples"]
    assert [s["kind"] for s in mm] == ["image", "audio", "image"]
    from calibrate.audio import embedded_clips
    from calibrate.images import embedded_images

    images = {it.id: it.image for it in embedded_images("calib")}
    clips = {it.id: it.waveform for it in embedded_clips("calib")}
    for sample, rec in zip(cs.multimodal, mm):
        placeholder = processor.image_token if rec["kind"] == "image" else processor.audio_token
        # Hand-written Gemma 3n turn format, tokenized by the processor itself.
        text = f"{tok.bos_token}<start_of_turn>user\n{placeholder}{rec['prompt']}<end_of_turn>\n<start_of_turn>model\n"
        media = {"images": [images[rec["item"]]]} if rec["kind"] == "image" else {"audio": [clips[rec["item"]]]}
        ref = processor(text=[text], add_special_tokens=False, return_tensors="pt", **media)
        assert set(sample) == set(ref)
        for k in ref:
            assert torch.equal(sample[k], ref[k]), k
        ids = sample["input_ids"][0]
        assert (ids == tok.bos_token_id).sum() == 1
        n_soft = processor.image_seq_length if rec["kind"] == "image" else processor.audio_seq_length
        soft_id = processor.image_token_id if rec["kind"] == "image" else processor.audio_token_id
        assert (ids == soft_id).sum() == n_soft
        assert torch.equal(sample["token_type_ids"][0] != 0, ids == soft_id)
    # The image sample's pixels are the calibration image's pixels.
    assert torch.equal(cs.multimodal[0]["pixel_values"][0], cs.images[0])


def test_google_template_and_placeholder_fallback_render_the_same_prompt(processor, caplog):
    google = copy.copy(processor)
    google.chat_template = GEMMA3N_TEMPLATE
    with caplog.at_level(logging.WARNING, logger="calibrate.multimodal"):
        ours = render_prompt(google, "audio", "Transcribe this audio clip.")
    assert not caplog.records  # Google's template needs no fallback
    # The tiny model's template renders media items as <start_of_audio>: the fallback applies.
    tiny = render_prompt(processor, "audio", "Transcribe this audio clip.")
    expected = f"{processor.tokenizer.bos_token}<start_of_turn>user\n<audio_soft_token>Transcribe this audio clip.<end_of_turn>\n<start_of_turn>model\n"
    assert ours == expected
    assert tiny == expected


def test_multimodal_samples_run_through_the_tiny_model(tiny_random):
    """One image and one audio forward of Gemma3nForConditionalGeneration; both towers feed the decoder.

    The image processor is set to 256x256 here only to keep the test fast (MobileNetV5's
    multi-scale fusion still yields 16x16 = 256 soft tokens); preprocessing at the model's own
    768x768 is covered above.
    """
    from transformers import AutoProcessor, Gemma3nForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(tiny_random), size={"height": 256, "width": 256})
    cs = build_calibration(config(2), processor, seed=1)
    model = Gemma3nForConditionalGeneration.from_pretrained(str(tiny_random)).eval()
    calls = {"vision": 0, "audio": 0}
    hooks = [
        model.model.vision_tower.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1)),
        model.model.audio_tower.register_forward_hook(lambda *a: calls.__setitem__("audio", calls["audio"] + 1)),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine runs this faster without thread contention
    try:
        with torch.inference_mode():
            outs = [model(**s) for s in cs.multimodal]
    finally:
        torch.set_num_threads(threads)
        for h in hooks:
            h.remove()
    assert calls == {"vision": 1, "audio": 1}
    vocab = model.config.text_config.vocab_size
    for s, o in zip(cs.multimodal, outs):
        assert o.logits.shape == (1, s["input_ids"].shape[1], vocab)
        assert torch.isfinite(o.logits).all()
