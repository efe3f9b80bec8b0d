"""benchmarks/bench_memory.py runs end to end on a tiny model (no timing assertions: the numbers are the
benchmark's to print)."""
from __future__ import annotations

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCH)
    try:
        import bench_memory
        yield bench_memory
    finally:
        sys.path.remove(BENCH)


def test_resident_section_prints_every_configuration(bench, capsys):
    bench.main(["--model", "tiny:llama", "--dtype", "float32", "--sections", "resident", "--tokens", "96",
                "--steps", "6", "--kvquant", "kvquant:bits=2,outliers=0.01,calib_rows=1,calib_len=64"])
    out = capsys.readouterr().out
    for name in ("fp16", "kivi-2 packed", "kvquant packed", "hf-quanto-int2"):
        assert name in out
    assert "summary:" in out and "target 1.05" in out and "ms/token" in out


@pytest.mark.parametrize("protocol", ["fake", "prefill-decode", "decode"])
def test_linear_child_measures_peaks_and_linear_statistics(bench, protocol):
    r = bench.linear_child("tiny:llama", "float32", protocol, 64, 4)
    assert r["protocol"] == protocol and r["length"] == 64
    assert r["peak_bytes"] > 0 and r["decode_peak_bytes"] > 0 and r["seconds_per_token"] > 0
    assert 0 < r["largest_stats"] < 64 * 64          # statistics per key token, no T x T tensor held
