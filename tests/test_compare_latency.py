"""tools/compare_latency: the overlap rule and the per-condition summary, on fake compare results (no models)."""
from types import SimpleNamespace

from splam_studio.tools.compare_latency import overlap, summarise, to_report


def _result(teacher, lcm, splam, same=True):
    panels = {role: SimpleNamespace(latency_ms=sorted(runs)[len(runs) // 2], latency_runs=runs, unet_calls=calls)
              for role, runs, calls in (("teacher", teacher, 50), ("lcm", lcm, 4), ("splam", splam, 4))}
    return SimpleNamespace(panel=panels.__getitem__, same_architecture=same)


def test_overlap_is_ranges_meeting():
    assert overlap([10, 12, 14], [14, 20, 30]) and overlap([10, 20, 30], [12, 13, 14])
    assert not overlap([10, 11, 12], [13, 14, 15]) and not overlap([13, 14, 15], [10, 11, 12])


def test_summary_counts_overlaps_and_the_ratio():
    results = [_result([100, 110, 120], [10, 11, 12], [11, 12, 13]),  # overlap
               _result([100, 110, 120], [10, 11, 12], [20, 21, 22])]  # apart: SPLAM twice as slow
    c = summarise("loaded", 2, results, (3.0, 4.5))
    assert c["requests"] == 2 and c["students_overlap"] == 1 and c["same_architecture"]
    assert abs(c["splam_over_lcm"] - (12 / 11 + 21 / 11) / 2) < 1e-9
    rows = {r["panel"]: r for r in c["rows"]}
    assert rows["teacher"]["median_ms"] == 110 and rows["teacher"]["spread_ms"] == 20
    assert rows["lcm"]["unet_calls"] == [4] and rows["teacher"]["unet_calls"] == [50]
    table = to_report([c], 1, 4, 25)["tables"]
    assert table[0]["rows"][0][:3] == ["loaded", "teacher", "50"] and table[1]["rows"][0][1] == "1 of 2"
    assert table[1]["rows"][0][4] == "3.0-4.5"
