"""The forecast `moe-edge info` prints: its arithmetic and its probes."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from moe_edge.offload.forecast import STEP_SECONDS_PER_LAYER, forecast, probe_memory, probe_storage


def info(slots: int, experts: int = 64, top_k: int = 6, layers: int = 3, expert_bytes: int = 4 * 2**20):
    return SimpleNamespace(plan=SimpleNamespace(slots_per_layer=slots), experts_per_layer=experts,
                           top_k=top_k, moe_layers=layers, layers=layers + 1, expert_bytes=expert_bytes,
                           active_bytes=200 * 2**20)


STEP = 200 * 2**20 / 10e9 + 4 * STEP_SECONDS_PER_LAYER  # info(): 4 layers at 10 GB/s


def test_every_expert_cached_forecasts_the_resident_rate():
    f = forecast(info(64), memory_bps=10e9, storage_bps=1e9)
    assert f.misses_per_token == 0
    assert f.no_reuse_tps == f.resident_tps == pytest.approx(1 / STEP, rel=1e-3)


def test_misses_follow_the_uncached_share_and_cost_a_read_each():
    half, quarter = forecast(info(32), 10e9, 1e9), forecast(info(16), 10e9, 1e9)
    assert half.misses_per_token == pytest.approx(6 * 3 * 0.5)
    assert quarter.misses_per_token == pytest.approx(6 * 3 * 0.75)
    assert half.miss_ms == pytest.approx(4 * 2**20 / 1e9 * 1e3, rel=1e-3)
    expected = 1 / (STEP + 9 * 4 * 2**20 / 1e9)
    assert half.no_reuse_tps == pytest.approx(expected, rel=1e-2)
    assert quarter.no_reuse_tps < half.no_reuse_tps < half.resident_tps
    assert forecast(info(32), 10e9, 2e9).no_reuse_tps > half.no_reuse_tps  # a faster disk helps


def test_a_ram_tier_pays_memory_bandwidth_per_miss():
    f = forecast(info(32), 10e9, None)
    assert f.storage_gbps is None and f.miss_ms == pytest.approx(4 * 2**20 / 10e9 * 1e3, rel=1e-3)


def test_probes_measure_something_and_leave_nothing_behind(tmp_path: Path):
    assert probe_memory(nbytes=16 * 2**20) > 1e8  # any machine reads more than 100 MB/s
    assert probe_storage(tmp_path, record=256 * 1024, nbytes=4 * 2**20) > 1e6
    assert list(tmp_path.iterdir()) == []


def test_info_forecast_from_the_cli(tmp_path: Path, monkeypatch):
    """`moe-edge info --forecast` prints the range and, with --json, the numbers; the disk
    probe runs where the store would go ($MOE_EDGE_CACHE) and leaves nothing there."""
    import json

    from click.testing import CliRunner

    from moe_edge.cli import main
    monkeypatch.setenv("MOE_EDGE_CACHE", str(tmp_path))
    runner = CliRunner()
    text = runner.invoke(main, ["info", "--expert-cache", "50%", "--forecast"])
    assert text.exit_code == 0, text.output
    assert "forecast      decode " in text.output and "if routing has no reuse" in text.output
    doc = json.loads(runner.invoke(main, ["info", "--expert-cache", "50%", "--forecast", "--json"]).output)
    f = doc["forecast"]
    assert 0 < f["no_reuse_tps"] < f["resident_tps"] and f["storage_gbps"] > 0 and f["misses_per_token"] > 0
    assert list(tmp_path.iterdir()) == []
    assert "forecast" not in json.loads(runner.invoke(main, ["info", "--json"]).output)
