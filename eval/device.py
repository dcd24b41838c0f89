"""Device fingerprints: CPU, CUDA and Jetson facts recorded with every result.

Parsers take the text of a tool's output and never raise on unknown fields: tegrastats changed
its format across L4T releases (``cpu [..]@f`` / ``CPU [x%@f,..]``, ``GR3D`` / ``GR3D_FREQ
x%@[f,f]``, rails as ``cur/avg`` or ``curmW/avgmW``), so each field is matched on its own and
unknown tokens are ignored. Recorded samples with their provenance are under
``tests/data/eval/``.
"""
from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import threading
from pathlib import Path

log = logging.getLogger(__name__)

# ARM "CPU part" ids of Jetson (and common) cores, for /proc/cpuinfo without "model name".
ARM_PARTS = {
    ("0x41", "0xd07"): "Cortex-A57", ("0x41", "0xd08"): "Cortex-A72", ("0x41", "0xd42"): "Cortex-A78AE",
    ("0x41", "0xd0c"): "Neoverse-N1", ("0x41", "0xd4f"): "Neoverse-V2", ("0x41", "0xd83"): "Neoverse-V3AE",
    ("0x41", "0xd84"): "Neoverse-V3", ("0x4e", "0x004"): "NVIDIA Carmel",
}

_TS = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB(?: \(lfb (\d+)x(\d+)MB\))?")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB(?: \(cached (\d+)MB\))?")
_IRAM = re.compile(r"\bIRAM (\d+)/(\d+)kB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?", re.IGNORECASE)
_ENGINE = re.compile(r"\b(EMC_FREQ|EMC|GR3D_FREQ|GR3D2_FREQ|GR3D|VIC_FREQ|VIC|AVP)\s+(\d+)%(?:@\[?([\d,]+)\]?)?")
_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*)\s+(\d+)(?:mW)?/(\d+)(?:mW)?\b")
# Rails that measure the whole module's input, by generation (first found wins).
TOTAL_RAILS = ("VDD_IN", "VIN", "POM_5V_IN", "VIN_SYS_5V0")
OFF_SENSOR_C = -256.0  # tegrastats prints -256C for a power-gated sensor


def _engine(pct: str, freqs: str | None) -> dict:
    fs = [int(f) for f in freqs.split(",") if f] if freqs else []
    return {"load_pct": float(pct), "freq_mhz": fs[0] if len(fs) == 1 else (fs or None)}


def parse_tegrastats(line: str) -> dict:
    """One tegrastats line -> dict (fields that are absent are left out). Empty dict for junk.

    Keys: timestamp, ram_used_mb, ram_total_mb, lfb_blocks, lfb_block_mb, swap_used_mb,
    swap_total_mb, swap_cached_mb, iram_used_kb, iram_total_kb, cpu (list of {load_pct,
    freq_mhz} or None for an offline core), cpu_load_mean_pct, emc, gpu (GR3D), gpu2 (GR3D2),
    temps_c ({sensor: C}, power-gated sensors dropped), power_mw ({rail: {current, average}}),
    power_total_mw (the module input rail's current value).
    """
    out: dict = {}
    line = line.strip()
    if m := _TS.match(line):
        out["timestamp"] = m.group(1)
    if m := _RAM.search(line):
        out["ram_used_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
        if m.group(3):
            out["lfb_blocks"], out["lfb_block_mb"] = int(m.group(3)), int(m.group(4))
    if m := _SWAP.search(line):
        out["swap_used_mb"], out["swap_total_mb"] = int(m.group(1)), int(m.group(2))
        if m.group(3):
            out["swap_cached_mb"] = int(m.group(3))
    if m := _IRAM.search(line):
        out["iram_used_kb"], out["iram_total_kb"] = int(m.group(1)), int(m.group(2))
    if m := _CPU.search(line):
        shared = int(m.group(2)) if m.group(2) else None  # old format: one frequency for all
        cores = []
        for item in m.group(1).split(","):
            item = item.strip()
            cm = re.fullmatch(r"(\d+)%(?:@(\d+))?", item)
            if cm:
                freq = int(cm.group(2)) if cm.group(2) else shared
                cores.append({"load_pct": float(cm.group(1)), "freq_mhz": freq})
            elif item:
                cores.append(None)  # "off": core powered down
        out["cpu"] = cores
        online = [c["load_pct"] for c in cores if c]
        if online:
            out["cpu_load_mean_pct"] = sum(online) / len(online)
    for m in _ENGINE.finditer(line):
        name = m.group(1)
        key = {"EMC_FREQ": "emc", "EMC": "emc", "GR3D_FREQ": "gpu", "GR3D": "gpu", "GR3D2_FREQ": "gpu2",
               "VIC_FREQ": "vic", "VIC": "vic", "AVP": "avp"}[name]
        out.setdefault(key, _engine(m.group(2), m.group(3)))
    temps = {}
    for m in _TEMP.finditer(line):
        value = float(m.group(2))
        if value > OFF_SENSOR_C:
            temps[m.group(1)] = value
    if temps:
        out["temps_c"] = temps
    rails = {}
    for m in _RAIL.finditer(line):
        name = m.group(1)
        if name in ("RAM", "SWAP", "IRAM", "NC"):  # NC: not-connected channel of a monitor
            continue
        rails[name] = {"current": int(m.group(2)), "average": int(m.group(3))}
    if rails:
        out["power_mw"] = rails
        for name in TOTAL_RAILS:
            if name in rails:
                out["power_total_mw"] = rails[name]["current"]
                out["power_total_rail"] = name
                break
        else:
            out["power_total_mw"] = sum(r["current"] for r in rails.values())
            out["power_total_rail"] = "sum"
    return out


def parse_nvpmodel(text: str) -> dict:
    """``nvpmodel -q`` (or ``-q --verbose``) output -> {"mode": name, "id": int | None}.

    The mode's name follows ``NV Power Mode:`` (possibly after ``NVPM VERB: Current mode:``);
    its number is the next line that is an integer. Warning lines (``NVPM WARN``) are skipped.
    Empty dict when no mode is found.
    """
    lines = [ln.strip() for ln in text.splitlines()]
    for i, ln in enumerate(lines):
        m = re.search(r"NV Power Mode\s*:\s*(\S.*?)\s*$", ln)
        if not m:
            continue
        mode_id = None
        for nxt in lines[i + 1 :]:
            if re.fullmatch(r"\d+", nxt):
                mode_id = int(nxt)
                break
            if nxt and not nxt.startswith("NVPM"):
                break
        return {"mode": m.group(1), "id": mode_id}
    return {}


def parse_tegra_release(text: str) -> dict:
    """/etc/nv_tegra_release -> {"l4t": "36.4.3", "board", "date", ...}."""
    m = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)(.*)", text)
    if not m:
        return {}
    out = {"l4t": f"{m.group(1)}.{m.group(2)}"}
    for key, value in re.findall(r"(\w+):\s*([^,]+)", m.group(3)):
        out[key.lower()] = value.strip()
    return out


def parse_cpuinfo(text: str) -> dict:
    """/proc/cpuinfo -> {"model": str, "logical_cpus": int}; ARM cores named by their part id."""
    model = None
    parts = set()
    implementer = None
    n = 0
    for ln in text.splitlines():
        key, _, value = ln.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            n += 1
        elif key == "model name" and model is None:
            model = value
        elif key == "cpu implementer":
            implementer = value.lower()
        elif key == "cpu part" and implementer:
            parts.add(ARM_PARTS.get((implementer, value.lower()), f"{implementer}:{value.lower()}"))
        elif key == "hardware" and model is None and not parts:
            model = value
    if parts:
        model = " + ".join(sorted(parts))
    return {"model": model or platform.processor() or platform.machine(), "logical_cpus": n or os.cpu_count()}


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_bytes().decode(errors="replace")
    except OSError:
        return None


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("%s failed: %s", " ".join(cmd), e)
        return None


def read_jetson(root: str | Path = "/") -> dict | None:
    """Jetson module, L4T release and power mode; None when this is not a Jetson."""
    root = Path(root)
    model = _read(root / "proc/device-tree/model")
    release = _read(root / "etc/nv_tegra_release")
    if release is None and (model is None or "jetson" not in model.lower()):
        return None
    out = {"module": model.strip("\x00\n ") if model else None}
    if release:
        out["release"] = parse_tegra_release(release)
    nvp = _run(["nvpmodel", "-q"])
    if nvp:
        out["power_mode"] = parse_nvpmodel(nvp)
    return out


def cuda_fingerprint() -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    out = {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "total_memory_bytes": int(props.total_memory),
        "multiprocessors": int(props.multi_processor_count),
        "cuda_runtime": torch.version.cuda,
    }
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if smi and smi.strip():
        out["driver"] = smi.strip().splitlines()[0].strip()
    else:
        text = _read("/proc/driver/nvidia/version")
        if text and (m := re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", text)):
            out["driver"] = m.group(1)
    return out


def fingerprint(threads: int | None = None) -> dict:
    """Everything that identifies the machine a result was measured on."""
    cpu = parse_cpuinfo(_read("/proc/cpuinfo") or "")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    cpu.update({"available_cpus": affinity, "threads": threads, "machine": platform.machine()})
    fp = {"cpu": cpu, "os": platform.platform(), "python": platform.python_version()}
    try:
        import torch

        fp["torch"] = torch.__version__
    except ImportError:
        pass
    if (cuda := cuda_fingerprint()) is not None:
        fp["cuda"] = cuda
    if (jetson := read_jetson()) is not None:
        fp["jetson"] = jetson
    return fp


def device_label(fp: dict, device: str) -> str:
    """Short column name for reports: the Jetson module, the CUDA device or the CPU model."""
    if fp.get("jetson") and fp["jetson"].get("module"):
        mode = (fp["jetson"].get("power_mode") or {}).get("mode")
        return fp["jetson"]["module"] + (f" ({mode})" if mode else "")
    if device == "cuda" and fp.get("cuda"):
        return fp["cuda"]["name"]
    threads = fp.get("cpu", {}).get("threads")
    return f"{fp.get('cpu', {}).get('model', 'cpu')}" + (f" x{threads}t" if threads else "")


class TegrastatsSampler:
    """Runs ``tegrastats --interval MS`` in the background and summarises what it printed.

    ``command`` is the argv to run (tests pass a program that replays recorded lines). Use as a
    context manager; ``summary()`` afterwards. When the tool is absent nothing is started and
    ``summary()`` returns None.
    """

    def __init__(self, interval_ms: int = 500, command: list[str] | None = None):
        self.command = command or ["tegrastats", "--interval", str(interval_ms)]
        self.samples: list[dict] = []
        self._proc = None
        self._thread = None

    def __enter__(self) -> "TegrastatsSampler":
        if shutil.which(self.command[0]) is None:
            return self
        try:
            self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as e:
            log.warning("could not start %s: %s", self.command[0], e)
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            parsed = parse_tegrastats(line)
            if parsed:
                self.samples.append(parsed)

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._thread.join(timeout=5)

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        s = self.samples

        def series(key):
            return [x[key] for x in s if key in x]

        out: dict = {"n_samples": len(s)}
        if ram := series("ram_used_mb"):
            out["ram_used_mb_max"] = max(ram)
            out["ram_total_mb"] = s[-1].get("ram_total_mb")
        if gpu := [x["gpu"]["load_pct"] for x in s if "gpu" in x]:
            out["gpu_load_pct_mean"] = statistics.fmean(gpu)
            out["gpu_load_pct_max"] = max(gpu)
        if cpu := series("cpu_load_mean_pct"):
            out["cpu_load_pct_mean"] = statistics.fmean(cpu)
        if power := series("power_total_mw"):
            out["power_mw_mean"] = statistics.fmean(power)
            out["power_mw_max"] = max(power)
            out["power_rail"] = s[-1].get("power_total_rail")
        temps: dict[str, float] = {}
        for x in s:
            for k, v in x.get("temps_c", {}).items():
                temps[k] = max(v, temps.get(k, v))
        if temps:
            out["temps_c_max"] = temps
        return out
