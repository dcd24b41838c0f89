"""The calibration device: ``cpu``, ``cuda`` or ``cuda:N`` checked against what torch sees, and
the float settings the GPU computes statistics and GPTQ under.

Exact fp32 on CUDA: TF32 (10-bit mantissa products) would change Hessians and GPTQ's error
feedback, so codes would depend on a process-wide flag a caller may have set (Lightning and many
training scripts set ``torch.set_float32_matmul_precision("high")``). ``exact_cuda_math`` turns
TF32 off for matmuls and cuDNN, makes cuDNN pick deterministic algorithms without autotuning
(autotuning picks by timing, which varies run to run), and restores every flag afterwards:
library code leaves global state as it found it.

``torch.use_deterministic_algorithms`` is NOT switched on here: what the engine runs on the GPU
(matmuls, reductions, elementwise ops, SDPA forward, index assignment with unique indices) has
no kernel that torch lists as nondeterministic, and the switch makes every cuBLAS call fail unless the process set
``CUBLAS_WORKSPACE_CONFIG`` before CUDA started, which a library cannot arrange. Instead the GPU
test runs the engine under that switch in a fresh process (tests/test_gpu_paths.py), so a
nondeterministic kernel creeping in fails a test rather than a user's run.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from quantize.errors import RecipeError


DEVICE_HELP = "cpu, cuda or cuda:N"
# x86 CPU flags (Linux /proc/cpuinfo) of instructions that compute bf16 products in hardware;
# without them oneDNN converts bf16 to fp32 and its bf16 matmuls are no faster than fp32.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def parse_device(spec: str) -> tuple[str, int | None]:
    """("cpu", None), ("cuda", None) or ("cuda", N); anything else is a ``ValueError`` naming what
    is valid. (eval has its own parser for its ``--device``: eval never imports quantize;
    tests/test_gpu_paths.py checks that the two grammars agree.)"""
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", spec)
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    return m.group(1), int(m.group(2)) if m.group(2) is not None else None


def calibration_device(spec: str | torch.device) -> torch.device:
    """``spec`` as a ``torch.device`` (plain ``cuda``: the current CUDA device); a CUDA device
    torch does not see is one line naming what is valid."""
    try:
        kind, index = parse_device(str(spec))
    except ValueError as e:
        raise RecipeError(f"device: {e}") from None
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RecipeError(f"device {spec}: no CUDA device is available to torch (use device: cpu)")
    if index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise RecipeError(f"device {spec}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                          f"valid: cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (or the text given); empty where there is
    no such file (not Linux) or no ``flags`` line (not x86)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def native_bf16(device: torch.device, flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether ``device`` multiplies bf16 in hardware, and what that was decided from (one phrase
    for logs and the manifest). CUDA: compute capability 8.0 or later (Ampere, Jetson Orin and
    newer: bf16 tensor cores), of this device (``torch.cuda.is_bf16_supported`` asks the current
    one). CPU: an x86 flag of ``BF16_CPU_FLAGS`` (``flags``: the CPU's, read when None), and
    oneDNN in this torch build (without it torch multiplies bf16 in a slow reference loop);
    other CPUs count as without (not measured here)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        ok = (major, minor) >= (8, 0)
        return ok, (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                    f"{'computes' if ok else 'does not compute'} bf16 natively")
    found = sorted((cpu_flags() if flags is None else flags) & set(BF16_CPU_FLAGS))
    if found and not torch.backends.mkldnn.is_available():
        return False, f"the CPU has {' and '.join(found)}, but this torch has no oneDNN for bf16 matmuls"
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    return False, f"the CPU has none of {', '.join(BF16_CPU_FLAGS)}"


@contextmanager
def exact_cuda_math(device: torch.device) -> Iterator[None]:
    """IEEE fp32 matmuls, fp32 accumulation in bf16 matmuls and deterministic cuDNN while the
    block runs on ``device`` (a CUDA device; nothing changes for the CPU); ``device`` is also the
    current CUDA device, so any tensor made on plain ``cuda`` inside lands on the GPU asked for."""
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (torch.get_float32_matmul_precision(), matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark,
             matmul.allow_bf16_reduced_precision_reduction)
    try:
        torch.set_float32_matmul_precision("highest")
        matmul.allow_tf32 = False
        # bf16 matmuls (compute_dtype bfloat16, auto's choice on these GPUs) accumulate in fp32:
        # no split-K partial sums in bf16, which cuBLAS may otherwise choose by shape
        matmul.allow_bf16_reduced_precision_reduction = False
        cudnn.allow_tf32 = False
        cudnn.deterministic = True
        cudnn.benchmark = False
        with torch.cuda.device(device):
            yield
    finally:
        precision, matmul_tf32, cudnn_tf32, deterministic, benchmark, bf16_reduction = saved
        torch.set_float32_matmul_precision(precision)
        matmul.allow_tf32 = matmul_tf32  # after the precision, which also sets it
        matmul.allow_bf16_reduced_precision_reduction = bf16_reduction
        cudnn.allow_tf32 = cudnn_tf32
        cudnn.deterministic = deterministic
        cudnn.benchmark = benchmark
