"""bench/compare_table.py: ratios, size-matched target verdicts and WORSE flags on hand-made rows."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import compare_table as table  # noqa: E402


def row(name, side, qtype, size, kl, imatrix=None, pp=None, tg=None):
    return {"name": name, "side": side, "type": qtype, "imatrix": imatrix, "size_bytes": size, "bpw": size / 100,
            "ppl": 10 + kl, "kl_mean": kl, "top1": 0.9, "pp_tok_s": pp, "tg_tok_s": tg}


ROWS = [
    row("F32", "reference", "F32", 4000, 0.0),
    row("lc Q8_0", "llama.cpp", "Q8_0", 1000, 0.0010, False, 100, 50),
    row("lc Q8_0 imat", "llama.cpp", "Q8_0", 1000, 0.0008, True, 100, 50),
    row("lc Q4_0", "llama.cpp", "Q4_0", 600, 0.050, False, 120, 60),
    row("lc Q4_0 imat", "llama.cpp", "Q4_0", 600, 0.040, True, 120, 60),
    row("lc Q4_K_M", "llama.cpp", "Q4_K_M", 700, 0.030, False, 110, 55),
    row("lc Q4_K_M imat", "llama.cpp", "Q4_K_M", 700, 0.020, True, 110, 55),
    row("ours Q8_0", "ours", "Q8_0", 1000, 0.0009, None, 99, 50),
    row("ours Q4_0", "ours", "Q4_0", 600, 0.020, None, 120, 58),  # 0.5x of 0.040, but tg 58/60 < 0.98
    row("ours Q4_K_M", "ours", "Q4_K_M", 690, 0.018, None, 110, 55),
]


def test_verdicts_pick_best_file_no_larger_than_theirs():
    v = {x["type"]: x for x in table.quality_verdicts(ROWS)}
    assert v["Q4_0"]["ours"] == "ours Q4_0" and abs(v["Q4_0"]["kl_ratio"] - 0.5) < 1e-12 and v["Q4_0"]["met"]
    # at Q4_K_M's size (700) the best of ours is the Q4_K_M file (0.018 / 0.020 = 0.9 > 0.8)
    assert v["Q4_K_M"]["ours"] == "ours Q4_K_M" and abs(v["Q4_K_M"]["kl_ratio"] - 0.9) < 1e-12
    assert not v["Q4_K_M"]["met"]
    # Q8_0 is judged against llama.cpp's best Q8_0 (the imatrix one): 0.0009 > 0.0008
    assert v["Q8_0"]["theirs"] == "lc Q8_0 imat" and not v["Q8_0"]["met"]


def test_pairs_and_plain_summary_flag_what_is_worse():
    pairs = {(p["ours"], p["theirs"]): p for p in table.pair_rows(ROWS)}
    assert len(pairs) == 6  # each of ours against the plain and imatrix file of its type
    p = pairs[("ours Q4_0", "lc Q4_0")]
    assert abs(p["tg_tok_s"] - 58 / 60) < 1e-12 and p["speed_met"] is False
    assert pairs[("ours Q8_0", "lc Q8_0")]["speed_met"] is True  # 99/100 = 0.99 >= 0.98
    misses = table.plain_summary(table.quality_verdicts(ROWS), table.pair_rows(ROWS))
    assert any(m.startswith("WORSE: Q4_K_M") for m in misses)
    assert any(m.startswith("WORSE: ours Q4_0 runs at") for m in misses)
    assert not any(m.startswith("WORSE: Q4_0 quality") for m in misses)
    md = table.markdown(ROWS, table.quality_verdicts(ROWS), table.pair_rows(ROWS), "# t")
    assert "WORSE KL" in md and "SLOWER" in md and md.count("\n| ours") >= 3


def test_no_file_of_ours_small_enough_is_a_miss():
    rows = [r for r in ROWS if r["name"] != "ours Q4_0"]
    rows.append(row("ours big", "ours", "Q4_0", 650, 0.001))
    v = {x["type"]: x for x in table.quality_verdicts(rows)}
    assert v["Q4_0"]["ours"] is None and not v["Q4_0"]["met"]
    assert "no file of ours at that size" in " ".join(table.plain_summary(list(v.values()), []))


def test_speed_noise_floor_from_same_type_llamacpp_files():
    rows = [dict(r) for r in ROWS]
    for r in rows:
        if r["name"] == "lc Q4_0 imat":
            r["tg_tok_s"] = 54.0  # 0.9x of the plain file's 60
    n = table.speed_noise(rows)
    assert n["n"] == 6 and abs(n["min"] - 0.9) < 1e-12 and n["max"] == 1.0
    assert "noise floor" in table.markdown(rows, [], [], "")


def test_mixed_file_pairs_with_its_stated_type_and_counts_for_size_targets():
    mixed = dict(row("ours mix", "ours", "mix", 580, 0.010, None, 121, 57), pair_type="Q4_0")
    rows = [*ROWS, mixed]
    pairs = {(p["ours"], p["theirs"]): p for p in table.pair_rows(rows)}
    assert {k for k in pairs if k[0] == "ours mix"} == {("ours mix", "lc Q4_0"), ("ours mix", "lc Q4_0 imat")}
    assert pairs[("ours mix", "lc Q4_0")]["type"] == "Q4_0" and pairs[("ours mix", "lc Q4_0")]["speed_met"] is False
    v = {x["type"]: x for x in table.quality_verdicts(rows)}
    assert v["Q4_0"]["ours"] == "ours mix" and abs(v["Q4_0"]["kl_ratio"] - 0.25) < 1e-12  # 0.010 / 0.040
    assert v["Q4_K_M"]["ours"] == "ours mix" and v["Q4_K_M"]["met"]  # 0.010 / 0.020 = 0.5


def test_kl_intervals_mark_what_the_windows_do_not_resolve():
    """With per-window KL the verdicts carry a paired interval: ours 0.0009 vs 0.0008 on windows
    that disagree in sign is 'not resolved'; a ratio far from the limit on consistent windows is."""
    rows = [dict(r) for r in ROWS]
    by = {r["name"]: r for r in rows}
    by["lc Q8_0 imat"]["kl_windows"] = [0.0004, 0.0012, 0.0008, 0.0008]
    by["ours Q8_0"]["kl_windows"] = [0.0012, 0.0004, 0.0010, 0.0010]  # mean 0.0009: 1.125x, but window by window both ways
    by["lc Q4_0 imat"]["kl_windows"] = [0.030, 0.050, 0.040, 0.040]
    by["ours Q4_0"]["kl_windows"] = [0.015, 0.025, 0.020, 0.020]  # 0.5x in every window
    v = {x["type"]: x for x in table.quality_verdicts(rows)}
    q8, q4 = v["Q8_0"], v["Q4_0"]
    assert not q8["met"] and not q8["resolved"] and q8["kl_ratio_ci"]["lo"] < 1.0 < q8["kl_ratio_ci"]["hi"]
    assert q4["met"] and q4["resolved"] and abs(q4["kl_ratio_ci"]["lo"] - 0.5) < 1e-12 and abs(q4["kl_ratio_ci"]["hi"] - 0.5) < 1e-12
    assert v["Q4_K_M"]["kl_ratio_ci"] is None and v["Q4_K_M"]["resolved"]  # no windows: no interval
    misses = table.plain_summary(list(v.values()), table.pair_rows(rows))
    assert any(m.startswith("WORSE: Q8_0") and "not resolved" in m for m in misses)
    md = table.markdown(rows, list(v.values()), table.pair_rows(rows), "# t")
    assert "WORSE: target missed (not resolved)" in md and "WORSE KL (not resolved)" in md


def test_bench_model_verdict_says_when_the_windows_do_not_resolve_the_target():
    """bench/bench_models.py's Q4_0 / Q4_K_M check against 1.5: a ratio whose paired interval
    holds 1.5 is 'not resolved' on either side of it; rows from before the intervals keep a
    bare verdict."""
    from bench.bench_models import verdict

    assert verdict({"ratio": 1.39, "ratio_ci": {"lo": 1.13, "hi": 1.71}}) == "MISSED (not resolved)"
    assert verdict({"ratio": 1.62, "ratio_ci": {"lo": 1.45, "hi": 1.80}}) == "met (not resolved)"
    assert verdict({"ratio": 1.62, "ratio_ci": {"lo": 1.52, "hi": 1.80}}) == "met"
    assert verdict({"ratio": 1.16, "ratio_ci": {"lo": 1.02, "hi": 1.31}}) == "MISSED"
    assert verdict({"ratio": 1.5}) == "met"
