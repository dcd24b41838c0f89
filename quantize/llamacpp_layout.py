"""What llama.cpp hard-codes for Gemma 3n, and the check that a model agrees with it.

llama.cpp (as vendored in llama-cpp-python 0.3.36) does not read these values from the GGUF: it
assumes them. A model that differs either fails to load or, worse, loads and silently computes
a different function. So the GGUF writer refuses such a model (listing every difference) unless
the user forces it, in which case the file carries a warning in its metadata.

Where each value lives in llama.cpp:

- ``src/models/gemma3n.cpp``: ``n_layer_kv_from_start = 20`` (layers from 20 on reuse the KV
  cache of layer 18 when sliding, 19 when full: ``src/llama-model.cpp``'s reuse callback returns
  ``n_layer_kv_from_start - (is_swa(il) ? 2 : 1)``); ``load_swa_pattern(ml, 5)`` (period 5: four
  sliding layers, then one full, used when the GGUF has no pattern array); ``f_attention_scale = 1``.
- ``src/models/models.h``: ``n_layer_sparsity = 10`` with ``f_sparsity_std_mul = icdf(0.95)``.
- ``src/llama-hparams.h``: ``n_altup = 4``, ``i_altup_act = 0``, ``laurel_rank = 64``,
  ``n_embd_altup = 256``, ``f_final_logit_softcapping = 30`` (Gemma 3n never reads the key).
- The graph uses ``ggml_gelu`` (tanh approximation), multiplies by ``altup_correct_scale``
  unconditionally, has no attention biases and no RoPE scaling.
"""
from __future__ import annotations

from dataclasses import dataclass

from quantize.errors import ExportError

# One place for the numbers; ``describe_layout`` prints them for the README / manifest.
LLAMACPP_GEMMA3N = {
    "n_layer_kv_from_start": 20,
    "swa_period": 5,  # layers i with i % 5 == 4 are full attention, the rest sliding
    "n_layer_sparsity": 10,
    "activation_sparsity": 0.95,
    "altup_num_inputs": 4,
    "altup_active_idx": 0,
    "laurel_rank": 64,
    "hidden_size_per_layer_input": 256,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "altup_correct_scale": True,
}

LLAMACPP_SOURCE = "llama.cpp as vendored in llama-cpp-python 0.3.36"


@dataclass(frozen=True)
class Mismatch:
    key: str
    model: object
    llamacpp: object
    why: str

    def __str__(self) -> str:
        return f"{self.key}: model has {self.model!r}, llama.cpp assumes {self.llamacpp!r} ({self.why})"


def _expected_layer_types(n: int) -> list[str]:
    p = LLAMACPP_GEMMA3N["swa_period"]
    return ["full_attention" if i % p == p - 1 else "sliding_attention" for i in range(n)]


def _expected_sparsity(n: int) -> list[float]:
    k = LLAMACPP_GEMMA3N["n_layer_sparsity"]
    return [LLAMACPP_GEMMA3N["activation_sparsity"] if i < k else 0.0 for i in range(n)]


def check_layout(text_config: dict) -> list[Mismatch]:
    """Every difference between a Gemma 3n text config (``config.json``'s ``text_config``) and
    llama.cpp's hard-coded layout. Empty when llama.cpp computes the same function."""
    L = LLAMACPP_GEMMA3N
    out: list[Mismatch] = []
    n = int(text_config["num_hidden_layers"])
    shared = int(text_config.get("num_kv_shared_layers", 0) or 0)

    # llama.cpp gives layers < 20 their own KV and makes layers >= 20 reuse 18/19; with fewer than
    # 21 layers nothing is shared in llama.cpp, so transformers must share nothing either.
    first_shared_llama = L["n_layer_kv_from_start"] if n > L["n_layer_kv_from_start"] else n
    first_shared_model = n - shared
    if first_shared_model != first_shared_llama:
        out.append(Mismatch(
            "num_kv_shared_layers", shared, n - first_shared_llama,
            f"llama.cpp makes layers from {L['n_layer_kv_from_start']} on reuse the KV cache "
            f"(first reusing layer: model {first_shared_model}, llama.cpp {first_shared_llama})",
        ))

    types = list(text_config.get("layer_types") or [])
    want_types = _expected_layer_types(n)
    if types != want_types:
        diff = [i for i in range(max(len(types), n)) if i >= len(types) or i >= n or types[i] != want_types[i]]
        out.append(Mismatch(
            "layer_types", _summarise_types(types), _summarise_types(want_types),
            f"llama.cpp's Gemma 3n uses {L['swa_period'] - 1} sliding layers then 1 full, and takes the KV of "
            f"shared layers from layer 18 (sliding) and 19 (full); layers that differ: {diff[:12]}",
        ))

    pattern = [float(x) for x in (text_config.get("activation_sparsity_pattern") or [0.0] * n)]
    want_sp = _expected_sparsity(n)
    if len(pattern) != n or any(abs(a - b) > 1e-6 for a, b in zip(pattern, want_sp)):
        out.append(Mismatch(
            "activation_sparsity_pattern", _summarise_floats(pattern), _summarise_floats(want_sp),
            f"llama.cpp applies Gaussian top-k at {L['activation_sparsity']} to the first "
            f"{L['n_layer_sparsity']} layers and nowhere else",
        ))

    for key, why in (
        ("altup_num_inputs", "n_altup is fixed"),
        ("altup_active_idx", "i_altup_act is fixed"),
        ("laurel_rank", "laurel_rank is fixed"),
        ("hidden_size_per_layer_input", "n_embd_altup is fixed"),
        ("final_logit_softcapping", "Gemma 3n does not read the soft-capping key"),
        ("hidden_activation", "the graph uses ggml_gelu (tanh approximation)"),
        ("altup_correct_scale", "the graph always multiplies by altup_correct_scale"),
    ):
        have = text_config.get(key)
        want = L[key]
        same = (have is not None and abs(float(have) - float(want)) < 1e-9) if isinstance(want, float) else have == want
        if not same:
            out.append(Mismatch(key, have, want, why))

    if text_config.get("attention_bias"):
        out.append(Mismatch("attention_bias", True, False, "llama.cpp loads no attention biases for Gemma 3n"))
    rope = text_config.get("rope_parameters") or {}
    for kind, params in rope.items() if isinstance(rope, dict) else ():
        if isinstance(params, dict) and params.get("rope_type", "default") != "default":
            out.append(Mismatch(f"rope_parameters.{kind}.rope_type", params.get("rope_type"), "default",
                                "RoPE scaling is not applied by llama.cpp's Gemma 3n graph"))
    return out


def validate_layout(text_config: dict, force: bool, where: str = "model") -> list[str]:
    """Refuse (``ExportError`` listing each mismatch) unless ``force``; returns the mismatch
    lines so a forced writer can record them in the file's metadata."""
    mismatches = check_layout(text_config)
    lines = [str(m) for m in mismatches]
    if lines and not force:
        raise ExportError(
            f"{where}: llama.cpp hard-codes Gemma 3n's layout ({LLAMACPP_SOURCE}) and would silently compute "
            f"a different model; {len(lines)} mismatch(es):\n  - " + "\n  - ".join(lines)
            + "\nExport safetensors instead, or set exports.gguf.force: true to write the GGUF anyway "
            "(the file then carries this warning)"
        )
    return lines


def describe_layout() -> list[str]:
    """One line per hard-coded value, for the README and the run manifest."""
    return [f"{k} = {v!r}" for k, v in LLAMACPP_GEMMA3N.items()] + [f"source: {LLAMACPP_SOURCE}"]


def _summarise_types(types: list[str]) -> str:
    return "".join("F" if t.startswith("full") else "S" if t.startswith("sliding") else "?" for t in types)


def _summarise_floats(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:g}" for x in xs) + "]"
