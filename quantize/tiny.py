"""Tiny Gemma 3n models with all three towers, built offline and deterministically from a seed.

They are the embedded default model (``builtin:tiny-trained``) and the test fixtures. The text
config keeps every value llama.cpp hard-codes for Gemma 3n (see ``LLAMACPP_HARDCODED`` in
``quantize.llamacpp_layout``): 25 layers by default (``num_hidden_layers``; E4B has 35), KV shared from layer 20, 4 sliding + 1 full, activation
sparsity 0.95 on layers 0-9, AltUp 4, LAuReL rank 64, per-layer width 256. Only the widths and
the vocabulary are small.

Two flavours:
- ``random``: seeded initialisation, seconds; for unit tests.
- ``trained``: the text decoder trained briefly on the ``train`` split of the embedded corpus
  (text that ships with Python), so perplexity and KL mean something. Cached on disk under a
  content hash of everything that determines the weights.

Like Google's checkpoints (and unlike transformers >= 5 saves), the written safetensors keep
the dead ``k_proj``/``v_proj``/``k_norm``/``v_norm`` weights of KV-consumer layers unless
``dead_kv=False``: the pipeline must cope with both.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from calibrate import embedded_text

log = logging.getLogger(__name__)

FLAVOURS = ("random", "trained")
TEXT_VOCAB = 4096  # SentencePiece pieces; the 256 vision/audio slots follow, as in Gemma 3n
MM_SLOTS = 128  # per modality
BUILDER_VERSION = "6"  # bump when anything below changes the weights or files

# Special pieces inside the SentencePiece model (after <pad>, <eos>, <bos>, <unk> at 0-3).
SP_USER_SYMBOLS = ("<mask>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<start_of_audio>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image_soft_token>' }}"
    "{%- elif item['type'] == 'audio' -%}{{ '<audio_soft_token>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


KEY_NEUTRAL_DEFAULTS = {"num_hidden_layers": 25}


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines a tiny model's files."""

    flavour: str = "random"
    seed: int = 0
    hidden_size: int = 256
    intermediate_size: int = 512
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    # 25: the fewest layers that keep llama.cpp's hard-coded KV sharing from layer 20 (E2B has
    # 30, E4B 35); the layers from 20 on are KV consumers.
    num_hidden_layers: int = 25
    vision_channel_multiplier: float = 0.25
    audio_hidden_size: int = 128
    audio_layers: int = 2
    dead_kv: bool = True
    # Small steps: Gemma 3n's AltUp streams make each token costly on a CPU; 240 steps of
    # 4 x 64 tokens take about 5 minutes on one core and bring perplexity far below uniform.
    train_steps: int = 240
    train_seq_len: int = 64
    train_batch: int = 4
    train_lr: float = 5e-3

    def cache_key(self) -> str:
        import torch
        import transformers

        spec = asdict(self)
        # Fields added after models were cached leave the key of a default-valued spec as it was.
        for field, default in KEY_NEUTRAL_DEFAULTS.items():
            if spec[field] == default:
                del spec[field]
        payload = json.dumps(
            {
                "spec": spec,
                "builder": BUILDER_VERSION,
                "corpus": embedded_text.corpus_hash(),
                "torch": torch.__version__.split("+")[0],
                "transformers": transformers.__version__,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    env = os.environ.get("GEMMA3N_QUANT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gemma3n-quantize"


def text_config_kwargs(spec: TinySpec) -> dict:
    """Gemma3nTextConfig arguments: tiny widths, llama.cpp's hard-coded structure."""
    n_layers = spec.num_hidden_layers
    if n_layers <= 20:
        raise ValueError(f"num_hidden_layers {n_layers}: llama.cpp's Gemma 3n shares KV from layer 20, so a tiny "
                         "model needs at least 21 layers")
    return dict(
        vocab_size=TEXT_VOCAB + 2 * MM_SLOTS,
        vocab_size_per_layer_input=TEXT_VOCAB,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        num_kv_shared_layers=n_layers - 20,
        layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n_layers)],
        activation_sparsity_pattern=[0.95] * 10 + [0.0] * (n_layers - 10),
        altup_num_inputs=4,
        laurel_rank=64,
        hidden_size_per_layer_input=256,
        sliding_window=64,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def build_config(spec: TinySpec, token_ids: dict[str, int]):
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nTextConfig, Gemma3nVisionConfig

    text = Gemma3nTextConfig(**text_config_kwargs(spec))
    vision = Gemma3nVisionConfig(
        model_args={"channel_multiplier": spec.vision_channel_multiplier}, vocab_offset=TEXT_VOCAB
    )
    audio = Gemma3nAudioConfig(
        hidden_size=spec.audio_hidden_size,
        conf_num_attention_heads=4,
        conf_num_hidden_layers=spec.audio_layers,
        vocab_offset=TEXT_VOCAB + MM_SLOTS,
    )
    config = Gemma3nConfig(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        boi_token_id=token_ids["<start_of_image>"],
        eoi_token_id=token_ids["<end_of_image>"],
        image_token_id=token_ids["<image_soft_token>"],
        boa_token_id=token_ids["<start_of_audio>"],
        eoa_token_id=token_ids["<end_of_audio>"],
        audio_token_id=token_ids["<audio_soft_token>"],
    )
    config.architectures = ["Gemma3nForConditionalGeneration"]
    return config


# --------------------------------------------------------------------------- tokenizer


def _mm_added_tokens() -> list[str]:
    """The 256 tokens after the SentencePiece vocabulary, laid out as in Gemma 3n."""
    vision = ["<end_of_image>", "<image_soft_token>"] + [f"<unused_vision_{i}>" for i in range(MM_SLOTS - 2)]
    audio = ["<end_of_audio>", "<audio_soft_token>"] + [f"<unused_audio_{i}>" for i in range(MM_SLOTS - 2)]
    return vision + audio


def train_sentencepiece(out_dir: Path, seed: int) -> Path:
    """Train a BPE SentencePiece model on the embedded train split, Gemma-style settings."""
    import sentencepiece as spm

    corpus = out_dir / "sp_corpus.txt"
    lines: list[str] = []
    for doc in embedded_text.split_documents("train"):
        lines.extend(line for line in doc.text.splitlines() if line.strip())
    corpus.write_text("\n".join(lines), encoding="utf-8")
    prefix = out_dir / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=TEXT_VOCAB,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=list(SP_USER_SYMBOLS),
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        input_sentence_size=200_000,
        shuffle_input_sentence=False,
        seed_sentencepiece_size=200_000,
        num_threads=1,  # single thread: identical model on every machine
        minloglevel=2,
    )
    corpus.unlink()
    (out_dir / "tokenizer.vocab").unlink()
    model_path = prefix.with_suffix(".model")
    _strip_trainer_paths(model_path)
    return model_path


def _strip_trainer_paths(model_path: Path) -> None:
    """SentencePiece stores its trainer's input and output paths (here a temporary folder) in
    the model: blank them so the same corpus and seed give a byte-identical tokenizer.model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = "tokenizer"
    model_path.write_bytes(proto.SerializeToString())


def build_tokenizer(folder: Path):
    """HF tokenizer from ``folder/tokenizer.model`` plus the 256 multimodal tokens; saved in place."""
    from transformers import GemmaTokenizer

    tok = GemmaTokenizer.from_pretrained(str(folder))
    added = _mm_added_tokens()
    tok.add_tokens(added, special_tokens=True)
    special = {
        "image_token": "<image_soft_token>",
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "audio_token": "<audio_soft_token>",
        "boa_token": "<start_of_audio>",
        "eoa_token": "<end_of_audio>",
    }
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    # Reload with the named multimodal tokens that Gemma3nProcessor reads (tokenizer.image_token...).
    tok = GemmaTokenizer.from_pretrained(str(folder), extra_special_tokens=special, add_bos_token=True)
    tok.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for machine_specific in ("vocab_file", "is_local", "local_files_only"):
        cfg.pop(machine_specific, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return tok


# --------------------------------------------------------------------------- build


def build_tiny(out: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a tiny model folder at ``out`` (atomically: a temp folder renamed at the end)."""

    if spec.flavour not in FLAVOURS:
        raise ValueError(f"unknown tiny flavour {spec.flavour!r}; valid: {', '.join(FLAVOURS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        _build_into(tmp, spec)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _build_into(folder: Path, spec: TinySpec) -> None:
    import torch
    from transformers import (
        Gemma3nAudioFeatureExtractor,
        Gemma3nForConditionalGeneration,
        Gemma3nProcessor,
        GenerationConfig,
        SiglipImageProcessor,
    )

    log.info("training the tiny tokenizer (%d pieces)", TEXT_VOCAB)
    train_sentencepiece(folder, spec.seed)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    tok = build_tokenizer(folder)
    ids = {t: tok.convert_tokens_to_ids(t) for t in (*SP_USER_SYMBOLS, *_mm_added_tokens()[:2], "<end_of_audio>", "<audio_soft_token>")}
    assert ids["<end_of_image>"] == TEXT_VOCAB and ids["<audio_soft_token>"] == TEXT_VOCAB + MM_SLOTS + 1, ids

    config = build_config(spec, ids)
    torch.manual_seed(spec.seed)
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = Gemma3nForConditionalGeneration(config).eval()
    if spec.flavour == "trained":
        train_text(model, tok, spec)

    # Keep tied weights tied and values deterministic in the saved file.
    model.save_pretrained(str(folder), safe_serialization=True)
    if spec.dead_kv:
        add_dead_kv(folder / "model.safetensors", config.text_config, spec.seed)

    image_processor = SiglipImageProcessor(
        size={"height": 768, "width": 768},
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        do_normalize=False,
        resample=2,
    )
    processor = Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(folder))
    GenerationConfig(bos_token_id=2, eos_token_id=[1, ids["<end_of_turn>"]], pad_token_id=0).save_pretrained(str(folder))
    (folder / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2, sort_keys=True))


def add_dead_kv(path: Path, text_config, seed: int) -> None:
    """Add k_proj, v_proj and k_norm weights to KV-consumer layers, as Google's checkpoints have.

    transformers >= 5 builds no such modules and drops these keys on load; llama.cpp still needs
    a tensor under each name. Values are seeded random, i.e. visibly dead: any code that used
    them would change the model's output.
    """
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(seed + 1)
    d, kv = text_config.hidden_size, text_config.num_key_value_heads * text_config.head_dim
    for i, mode in enumerate(text_config.kv_sharing_modes):
        if mode != "reuse":
            continue
        p = f"model.language_model.layers.{i}.self_attn."
        tensors[p + "k_proj.weight"] = (torch.randn(kv, d, generator=gen) * 0.02).to(torch.float32)
        tensors[p + "v_proj.weight"] = (torch.randn(kv, d, generator=gen) * 0.02).to(torch.float32)
        tensors[p + "k_norm.weight"] = torch.ones(text_config.head_dim)
    save_file(dict(sorted(tensors.items())), str(path), metadata={"format": "pt"})


def train_text(model, tok, spec: TinySpec) -> None:
    """A short next-token training run of the text decoder on the embedded train split."""
    import torch
    from tqdm import tqdm

    ids: list[int] = []
    for doc in embedded_text.split_documents("train"):
        ids.extend(tok(doc.text, add_special_tokens=False)["input_ids"])
        ids.append(1)
    data = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(spec.seed)
    # The per-layer embedding table (26M of the tiny model's 48M text parameters) and its model
    # projection stay at their seeded values: updating them dominates a CPU step's cost, and the
    # decoder layers learn around them.
    frozen = ("embed_tokens_per_layer", "per_layer_model_projection")
    for n, p in model.named_parameters():
        p.requires_grad_("language_model" in n and not any(f in n for f in frozen))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.train_lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.train_lr, total_steps=spec.train_steps, pct_start=0.1)
    model.train()
    # One thread: the tiny model's many small ops make torch's thread pool spin on a busy 2-core
    # machine (seen here: 55 s/step with the default pool under load, 1.3 s/step with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    L = spec.train_seq_len
    bar = tqdm(range(spec.train_steps), desc="training tiny text model", unit="step")
    for step in bar:
        starts = torch.randint(0, len(data) - L - 2, (spec.train_batch,), generator=gen)
        batch = torch.stack([data[s : s + L] for s in starts.tolist()])
        batch[:, 0] = 2  # <bos>
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{out.loss.item():.3f}")
    torch.set_num_threads(threads)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def cached_tiny(flavour: str = "trained", cache_dir: str | Path | None = None, **overrides) -> Path:
    """Path of a tiny model folder, built once and reused (keyed by a content hash)."""
    import fcntl

    spec = TinySpec(flavour=flavour, **overrides)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / f"tiny-{flavour}-{spec.cache_key()}"
    if (folder / "model.safetensors").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    # One builder at a time: concurrent test processes wait for the first build instead of
    # each training their own copy.
    with open(root / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "model.safetensors").exists():
            return folder
        log.info("building tiny %s model into %s", flavour, folder)
        return build_tiny(folder, spec)
