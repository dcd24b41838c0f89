"""bench/e4b_calibrated.py's ``--repeat`` rows: medians over runs, against hand-computed values."""
from __future__ import annotations

import pytest

from bench.e4b_calibrated import STEPS, combine, markdown, verdict

GiB = 2**30


def _run(ours_wall: float, ours_cpu: float, ours_peak: int, steps: tuple[float, float, float], peak: int) -> dict:
    lc = {s: {"wall_s": w, "cpu_s": 2 * w, "peak_rss_bytes": peak} for s, w in zip(STEPS, steps)}
    lc.update(wall_s=sum(steps), cpu_s=2 * sum(steps), peak_rss_bytes=peak, gguf_bytes=100)
    ours = {"wall_s": ours_wall, "cpu_s": ours_cpu, "peak_rss_bytes": ours_peak, "gguf_bytes": 90}
    return {"calib": "4x512", "tokens": 2048, "layers": 35, "compute_dtype": "bfloat16", "llamacpp_outtype": "bf16",
            "ours": ours, "llamacpp": lc, "load_average": (2.0, 2.0, 2.0),
            "ratio": {"wall": ours_wall / sum(steps), "cpu": ours_cpu / (2 * sum(steps)), "peak_rss": ours_peak / peak}}


def test_one_run_is_its_own_row():
    r = _run(450, 800, 3 * GiB, (75, 60, 115), 21 * GiB)
    assert combine([r]) is r


def test_repeated_runs_give_medians_and_keep_each_pair():
    runs = [_run(435, 799, 3 * GiB, (75, 59, 116), 21 * GiB),   # ratio 1.74
            _run(469, 856, 4 * GiB, (92, 79, 128), 22 * GiB),   # ratio 469 / 299
            _run(420, 780, 2 * GiB, (70, 60, 110), 20 * GiB)]   # ratio 420 / 240 = 1.75
    r = combine(runs)
    assert r["ours"]["wall_s"] == 435 and r["ours"]["cpu_s"] == 799 and r["ours"]["peak_rss_bytes"] == 3 * GiB
    assert r["llamacpp"]["wall_s"] == 250 and r["llamacpp"]["peak_rss_bytes"] == 21 * GiB  # totals 250, 299, 240
    assert r["llamacpp"]["imatrix"]["wall_s"] == 60 and r["llamacpp"]["quantize"]["wall_s"] == 116
    # the ratio is the median of each pair's own ratio, not a ratio of medians (435 / 250 = 1.74)
    assert r["ratio"]["wall"] == pytest.approx(435 / 250)
    assert sorted(x["ratio"]["wall"] for x in r["repeats"])[1] == r["ratio"]["wall"]
    assert [x["ours_wall_s"] for x in r["repeats"]] == [435, 469, 420]
    assert verdict(r) == "MISSED: wall time"
    cell = markdown([r], "# t").splitlines()[-1].split(" | ")[8]
    assert cell == "1.74 (median of 3: 1.74, 1.57, 1.75)"


def test_an_even_number_of_runs_takes_the_middle_two():
    r = combine([_run(300, 500, GiB, (100, 50, 50), 20 * GiB), _run(400, 700, GiB, (100, 100, 50), 20 * GiB)])
    assert r["ours"]["wall_s"] == 350 and r["llamacpp"]["wall_s"] == 225
    assert r["ratio"]["wall"] == pytest.approx((300 / 200 + 400 / 250) / 2)
    assert verdict(r) == "MISSED: wall time"  # (1.5 + 1.6) / 2 = 1.55
