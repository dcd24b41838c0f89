"""Tower embeddings as the eval harness extracts them equal the audio/vision soft tokens the
model's own forward inserts into the prompt (guards the tower's padding-mask polarity)."""
import numpy as np
import torch


def test_eval_tower_embeddings_match_the_models_forward(tiny_trained):
    from transformers import AutoProcessor, Gemma3nForConditionalGeneration

    from calibrate import heldout_audio
    from eval.towers import embeddings

    proc = AutoProcessor.from_pretrained(tiny_trained)
    model = Gemma3nForConditionalGeneration.from_pretrained(tiny_trained).eval()
    wave, rate = heldout_audio()[0]
    feats = proc.feature_extractor([wave], sampling_rate=rate, return_tensors="pt")
    ours = embeddings(model, torch.device("cpu"), [], [(feats["input_features"], feats["input_features_mask"])])["audio"][0]

    captured = {}
    hook = model.model.language_model.embed_tokens.register_forward_hook(lambda m, a, o: captured.setdefault("embeds", o))
    text = proc.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "hi"}]}], tokenize=False
    )
    inputs = proc(text=text, audio=[wave], sampling_rate=rate, return_tensors="pt", add_special_tokens=False)
    scattered = {}

    def grab(_m, args, kwargs, out):
        scattered["x"] = kwargs.get("inputs_embeds", args[0] if args else None)

    h2 = model.model.language_model.register_forward_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    h2.remove()
    positions = (inputs["input_ids"][0] == model.config.audio_token_id).nonzero().squeeze(-1)
    inserted = scattered["x"][0, positions[: ours.shape[0]]].float().numpy()
    assert np.abs(ours).max() > 0.1  # a fully masked clip would give all-zero embeddings
    np.testing.assert_allclose(ours, inserted, rtol=1e-4, atol=1e-5)
