"""Device profiles for ``fit``: the memory a model may use on each device, and where the number
comes from.

``total`` is the device's memory as its maker states it (decimal GB on NVIDIA's pages; Jetson
memory is shared by CPU and GPU). ``reserve`` is OUR assumption, not a maker's number: what the
operating system and the rest of the device keep (Jetson: JetPack's Linux for Tegra booted
headless, with the CUDA context; phone: Android and foreground apps). ``usable = total - reserve``
is what the model (weights, KV cache, mmproj, llama.cpp's compute buffers) may take.
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 10**9
GIB = 2**30

JETSON_ORIN = "https://www.nvidia.com/en-us/autonomous-machines/embedded-systems/jetson-orin/"
JETSON_THOR = "https://www.nvidia.com/en-us/autonomous-machines/embedded-systems/jetson-thor/"
JETSON_RESERVE = "assumption: 1.5 GiB for JetPack (L4T) booted headless plus the CUDA context"


@dataclass(frozen=True)
class Device:
    name: str
    title: str
    total: int  # bytes, as the maker states it
    reserve: int  # bytes kept by the OS and the rest of the device (our assumption)
    source: str  # where ``total`` comes from
    reserve_note: str

    @property
    def usable(self) -> int:
        return self.total - self.reserve


DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("jetson-orin-nano-8gb", "Jetson Orin Nano 8GB (128-bit LPDDR5, shared CPU/GPU)", 8 * GB, int(1.5 * GIB),
           JETSON_ORIN + " (technical specifications: Jetson Orin Nano 8GB, memory 8GB)", JETSON_RESERVE),
    Device("jetson-orin-nx-16gb", "Jetson Orin NX 16GB (128-bit LPDDR5, shared CPU/GPU)", 16 * GB, int(1.5 * GIB),
           JETSON_ORIN + " (technical specifications: Jetson Orin NX 16GB, memory 16GB)", JETSON_RESERVE),
    Device("jetson-agx-orin-32gb", "Jetson AGX Orin 32GB (256-bit LPDDR5, shared CPU/GPU)", 32 * GB, int(1.5 * GIB),
           JETSON_ORIN + " (technical specifications: Jetson AGX Orin 32GB, memory 32GB)", JETSON_RESERVE),
    Device("jetson-agx-orin-64gb", "Jetson AGX Orin 64GB (256-bit LPDDR5, shared CPU/GPU)", 64 * GB, int(1.5 * GIB),
           JETSON_ORIN + " (technical specifications: Jetson AGX Orin 64GB, memory 64GB)", JETSON_RESERVE),
    Device("jetson-thor", "Jetson AGX Thor (T5000, 256-bit LPDDR5X, shared CPU/GPU)", 128 * GB, 2 * GIB,
           JETSON_THOR + " (technical specifications: Jetson T5000, memory 128GB)",
           "assumption: 2 GiB for JetPack 7 booted headless plus the CUDA context"),
    Device("phone-6gb", "phone class, 6 GB (e.g. Google Pixel 6a)", 6 * GB, 3 * GIB,
           "https://store.google.com/product/pixel_6a_specs (memory: 6 GB LPDDR5)",
           "assumption: 3 GiB kept by Android, its services and the foreground app's UI (low-memory killer headroom)"),
)}


def get_device(name: str) -> Device:
    from quantize.errors import RecipeError

    if name not in DEVICES:
        raise RecipeError(f"unknown device profile {name!r}; valid: {', '.join(DEVICES)}")
    return DEVICES[name]
