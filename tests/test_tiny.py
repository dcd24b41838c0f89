"""Tiny Gemma 3n fixtures: llama.cpp's hard-coded structure, tokenizer agreement with
SentencePiece itself, a working processor, determinism, and a trained text decoder."""
import hashlib
import json
import math

import pytest
import torch

# What llama.cpp's src/models/gemma3n.cpp and llama-hparams.h hard-code for Gemma 3n
# (read in the llama-cpp-python 0.3.36 sdist; see ../shared/gemma3n-notes.md).
LLAMACPP_FIXED = {
    "n_layer_kv_from_start": 20,
    "sliding_period": 5,  # 4 sliding + 1 full
    "n_layer_sparsity": 10,
    "sparsity": 0.95,
    "n_altup": 4,
    "laurel_rank": 64,
    "n_embd_altup": 256,
}


def _text_config(folder):
    return json.loads((folder / "config.json").read_text())["text_config"]


def test_text_config_respects_llamacpp_hardcoded_layout(tiny_random):
    tc = _text_config(tiny_random)
    n = tc["num_hidden_layers"]
    assert n - tc["num_kv_shared_layers"] == LLAMACPP_FIXED["n_layer_kv_from_start"]
    for i, t in enumerate(tc["layer_types"]):
        full = (i + 1) % LLAMACPP_FIXED["sliding_period"] == 0
        assert t == ("full_attention" if full else "sliding_attention"), i
    k = LLAMACPP_FIXED["n_layer_sparsity"]
    assert tc["activation_sparsity_pattern"] == [LLAMACPP_FIXED["sparsity"]] * k + [0.0] * (n - k)
    assert tc["altup_num_inputs"] == LLAMACPP_FIXED["n_altup"]
    assert tc["laurel_rank"] == LLAMACPP_FIXED["laurel_rank"]
    assert tc["hidden_size_per_layer_input"] == LLAMACPP_FIXED["n_embd_altup"]
    assert min(tc["intermediate_size"]) >= 512


def test_all_three_towers_present(tiny_random):
    from quantize.model import Checkpoint, tower_of

    towers = {tower_of(i.name, len(i.shape)) for i in Checkpoint(tiny_random).tensors.values()}
    assert {"text", "vision", "audio", "per_layer_embeddings", "altup_laurel", "embedders"} <= towers


def test_hf_tokenizer_matches_sentencepiece(tiny_random):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from calibrate.embedded_text import split_documents

    sp = spm.SentencePieceProcessor(model_file=str(tiny_random / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(tiny_random)
    for doc in split_documents("eval")[:4]:
        text = doc.text[:3000]
        assert tok(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)


def test_processor_and_multimodal_token_layout(tiny_random):
    from transformers import AutoConfig, AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_random)
    cfg = AutoConfig.from_pretrained(tiny_random)
    tok = proc.tokenizer
    assert tok.image_token_id == cfg.image_token_id and tok.audio_token_id == cfg.audio_token_id
    assert tok.convert_tokens_to_ids(tok.eoi_token) == cfg.eoi_token_id == cfg.vision_config.vocab_offset
    assert tok.convert_tokens_to_ids(tok.eoa_token) == cfg.eoa_token_id == cfg.audio_config.vocab_offset
    assert len(tok) == cfg.text_config.vocab_size
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_random_build_is_deterministic(tiny_random, tmp_path):
    from quantize.tiny import TinySpec, build_tiny

    again = build_tiny(tmp_path / "again", TinySpec(flavour="random"))
    for name in ("model.safetensors", "tokenizer.model", "tokenizer.json", "config.json"):
        a = hashlib.sha256((tiny_random / name).read_bytes()).hexdigest()
        b = hashlib.sha256((again / name).read_bytes()).hexdigest()
        assert a == b, name


def _eval_ppl(folder, n_tokens=512):
    from transformers import AutoTokenizer, Gemma3nForConditionalGeneration

    from calibrate.embedded_text import split_documents

    tok = AutoTokenizer.from_pretrained(folder)
    model = Gemma3nForConditionalGeneration.from_pretrained(folder).eval()
    ids = tok(split_documents("eval")[0].text)["input_ids"][:n_tokens]
    x = torch.tensor([ids])
    with torch.no_grad():
        loss = model(input_ids=x, labels=x).loss
    return math.exp(loss.item())


def test_trained_model_has_meaningful_perplexity(tiny_trained, tiny_random):
    trained, random = _eval_ppl(tiny_trained), _eval_ppl(tiny_random)
    vocab = _text_config(tiny_trained)["vocab_size"]
    # held-out text (eval split, never trained on): far below the random model and uniform
    assert trained < random / 5 and trained < vocab / 8, (trained, random)


def test_depth_field_keeps_llamacpp_layout_and_old_cache_keys():
    """A 35-layer spec (E4B's depth) builds a config llama.cpp's layout check accepts, with the
    KV consumers where transformers puts them; the default spec's cache key is the one computed
    before the field existed (payload built by hand without it), so cached models stay valid."""
    import json
    from dataclasses import asdict

    import transformers
    from transformers import Gemma3nTextConfig

    from calibrate import embedded_text
    from quantize.llamacpp_layout import check_layout
    from quantize.tiny import BUILDER_VERSION, TinySpec, text_config_kwargs

    cfg = Gemma3nTextConfig(**text_config_kwargs(TinySpec(num_hidden_layers=35)))
    assert cfg.num_hidden_layers == 35 and cfg.num_kv_shared_layers == 15
    assert check_layout(cfg.to_dict()) == []
    with pytest.raises(ValueError, match="num_hidden_layers 20"):
        text_config_kwargs(TinySpec(num_hidden_layers=20))

    spec = TinySpec(flavour="trained")
    old = asdict(spec)
    del old["num_hidden_layers"]
    payload = json.dumps({"spec": old, "builder": BUILDER_VERSION, "corpus": embedded_text.corpus_hash(),
                          "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__},
                         sort_keys=True)
    assert spec.cache_key() == hashlib.sha256(payload.encode()).hexdigest()[:16]
    assert TinySpec(flavour="trained", num_hidden_layers=35).cache_key() != spec.cache_key()
