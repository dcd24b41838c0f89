"""eval.device parsers on recorded tegrastats / nvpmodel / nv_tegra_release output."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from eval.device import (TegrastatsSampler, parse_cpuinfo, parse_nvpmodel, parse_tegra_release, parse_tegrastats,
                         read_jetson)

DATA = Path(__file__).parent / "data" / "eval"


def lines(name: str) -> list[str]:
    return [ln for ln in (DATA / "tegrastats" / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_orin_agx_jp6_line():
    d = parse_tegrastats(lines("orin_agx_jp6.txt")[0])
    assert d["timestamp"] == "04-11-2025 10:36:27"
    assert (d["ram_used_mb"], d["ram_total_mb"], d["lfb_blocks"], d["lfb_block_mb"]) == (4321, 62801, 1759, 4)
    assert (d["swap_used_mb"], d["swap_total_mb"], d["swap_cached_mb"]) == (19, 31400, 0)
    assert len(d["cpu"]) == 12 and d["cpu"][0] == {"load_pct": 0.0, "freq_mhz": 729}
    assert d["emc"] == {"load_pct": 0.0, "freq_mhz": 2133}
    assert d["gpu"] == {"load_pct": 0.0, "freq_mhz": [0, 0]}  # one frequency per GPC
    # -256C marks power-gated sensors: dropped, the others kept
    assert "CV0" not in d["temps_c"] and "GPU" not in d["temps_c"]
    assert d["temps_c"]["CPU"] == 44.562 and d["temps_c"]["tj"] == 44.343
    assert d["power_mw"]["VDD_GPU_SOC"] == {"current": 2340, "average": 2340}
    assert "NC" not in d["power_mw"]
    assert d["power_total_mw"] == 4025 and d["power_total_rail"] == "VIN_SYS_5V0"


def test_orin_nano_jp5_lines():
    a, b = (parse_tegrastats(x) for x in lines("orin_nano_jp5.txt"))
    assert "timestamp" not in a
    assert a["cpu"][4] is None and a["cpu"][5] is None  # "off" cores
    assert a["cpu_load_mean_pct"] == pytest.approx((3 + 2 + 0 + 1) / 4)
    assert a["gpu"] == {"load_pct": 0.0, "freq_mhz": None}
    assert a["power_total_mw"] == 4062 and a["power_total_rail"] == "VDD_IN"
    assert b["gpu"]["load_pct"] == 61.0 and b["emc"] == {"load_pct": 13.0, "freq_mhz": 2133}
    assert b["power_mw"]["VDD_IN"] == {"current": 7350, "average": 5706}


def test_xavier_rails_without_units():
    d = parse_tegrastats(lines("xavier_agx_jp4.txt")[0])
    assert len(d["cpu"]) == 8 and d["cpu"][4:] == [None] * 4
    assert d["gpu"] == {"load_pct": 0.0, "freq_mhz": 318}
    assert d["power_mw"]["SOC"] == {"current": 1399, "average": 1399}
    assert d["power_mw"]["SYS5V"]["current"] == 1568
    assert d["temps_c"]["PMIC"] == 100.0 and d["temps_c"]["thermal"] == 33.35
    assert d["power_total_rail"] == "sum"  # no module-input rail on this board's list
    assert d["power_total_mw"] == 0 + 311 + 1399 + 0 + 311 + 1568


def test_nano_iram_and_pom_rails():
    d = parse_tegrastats(lines("nano_jp4.txt")[0])
    assert (d["iram_used_kb"], d["iram_total_kb"]) == (0, 252)
    assert d["power_total_mw"] == 1100 and d["power_total_rail"] == "POM_5V_IN"
    assert d["gpu"]["freq_mhz"] == 76


def test_tx1_oldest_format():
    a, b = (parse_tegrastats(x) for x in lines("tx1_l4t24.txt"))
    assert [c["freq_mhz"] for c in a["cpu"]] == [1912] * 4  # one frequency after the list
    assert [c["load_pct"] for c in b["cpu"]] == [1.0, 0.0, 0.0, 1.0]
    assert a["gpu"] == {"load_pct": 0.0, "freq_mhz": 76}  # "GR3D", not "GR3D_FREQ"
    assert b["emc"] == {"load_pct": 1.0, "freq_mhz": 408}
    assert "power_mw" not in a


def test_thor_line():
    d = parse_tegrastats(lines("thor_jp7.txt")[0])
    assert len(d["cpu"]) == 14 and d["ram_total_mb"] == 125772
    assert d["power_total_rail"] == "VIN" and d["power_total_mw"] == 23040
    assert "gpu" not in d["temps_c"] and d["temps_c"]["soc012"] == 47.5


def test_junk_is_empty():
    assert parse_tegrastats("") == {}
    assert parse_tegrastats("tegrastats: command not found") == {}


@pytest.mark.parametrize("name, mode, mode_id", [
    ("orin_maxn.txt", "MAXN", 0),
    ("orin_nano_25w.txt", "25W", 1),
    ("orin_nano_super_verbose.txt", "25W", 1),
    ("xavier_warn.txt", "MODE_15W", 2),
    ("orin_nano_maxn_super.txt", "MAXN_SUPER", 2),
])
def test_nvpmodel(name, mode, mode_id):
    assert parse_nvpmodel((DATA / "nvpmodel" / name).read_text()) == {"mode": mode, "id": mode_id}


def test_nvpmodel_junk():
    assert parse_nvpmodel("nvpmodel: command not found\n") == {}


def test_tegra_release():
    d = parse_tegra_release((DATA / "release" / "r36_4_3.txt").read_text())
    assert d["l4t"] == "36.4.3" and d["board"] == "generic" and d["date"].startswith("Wed Jan  8")
    assert parse_tegra_release((DATA / "release" / "r32_7_1.txt").read_text())["l4t"] == "32.7.1"


def test_read_jetson_from_a_fake_root(tmp_path):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text((DATA / "release" / "r36_4_3.txt").read_text())
    j = read_jetson(tmp_path)
    assert j["module"] == "NVIDIA Jetson AGX Orin Developer Kit" and j["release"]["l4t"] == "36.4.3"
    assert read_jetson(tmp_path / "nothing") is None


def test_cpuinfo_arm_parts():
    text = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd42\n\nprocessor\t: 1\nCPU implementer\t: 0x41\nCPU part\t: 0xd42\n"
    assert parse_cpuinfo(text) == {"model": "Cortex-A78AE", "logical_cpus": 2}
    assert parse_cpuinfo("processor : 0\nmodel name : Intel(R) Xeon(R)\n")["model"] == "Intel(R) Xeon(R)"


def test_sampler_reads_a_process(tmp_path):
    """The sampler runs a real subprocess that replays recorded lines, as tegrastats prints them."""
    replay = tmp_path / "replay.py"
    src = DATA / "tegrastats" / "orin_nano_jp5.txt"
    replay.write_text(f"import sys\nfor ln in open({str(src)!r}):\n    print(ln, end='', flush=True)\n")
    with TegrastatsSampler(command=[sys.executable, str(replay)]) as s:
        deadline = time.monotonic() + 30
        while len(s.samples) < 2 and time.monotonic() < deadline:  # the "run" being measured
            time.sleep(0.05)
    summary = s.summary()
    assert summary["n_samples"] == 2
    assert summary["ram_used_mb_max"] == 3347
    assert summary["gpu_load_pct_max"] == 61.0 and summary["gpu_load_pct_mean"] == pytest.approx(30.5)
    assert summary["power_mw_mean"] == pytest.approx((4062 + 7350) / 2) and summary["power_rail"] == "VDD_IN"
    assert summary["temps_c_max"]["cpu"] == 49.0


def test_sampler_without_the_tool():
    with TegrastatsSampler(command=["no-such-tegrastats-binary"]) as s:
        pass
    assert s.summary() is None
