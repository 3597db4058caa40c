"""bench/scaling_model.py: docs/SCALING.md's tables come from a report's
scale_* rows, and --write replaces only the marked section. As any user."""

from __future__ import annotations

import json

import pytest

from bench import scaling_model


def _report(cache_mb: float = 600.0, nginx_mb: float = 3000.0) -> dict:
    def row(name, value, baseline, detail):
        return {"name": name, "value": value, "baseline": baseline, "ratio": value / baseline, "detail": detail}

    sites = {f"s{i:02d}": {"rate_mbit": rate, "seconds_nginx": 10.0 + i, "seconds_direct": 9.0,
                           "link_seconds_for_one_stream": 8.0, "wan_bytes_nginx": 10_200_000}
             for i, rate in enumerate([20, 50, 100], start=1)}
    run = {"stream_bytes": 10_000_000}
    return {
        "run": {"size": "quick", "started": "2024-05-01T10:00:00+0000"},
        "machine": {"cores": 2, "cpu": "test"},
        "results": [
            row("scale_master_egress", 10_000_000, 10_000_000, {
                "sites_count": 3, "direct_master_over_one_stream": 3.0, "nginx": run, "direct": run,
                "by_replicas_behind_nginx": {"2": {"master_over_one_stream": 1.0},
                                             "3": {"master_over_one_stream": 1.0}},
                "wan_over_one_stream": 1.02, "master_cpu_seconds_per_gb_direct": 4.0,
                "control": {"master_link_bytes_per_s_out": 30_000, "master_link_bytes_per_s_in": 6_000,
                            "replicas": 3, "cache_servers": 3, "node_list_bytes_per_node": 2_500,
                            "catalogue_bytes": 2_000, "heartbeat_body_bytes": 2_000,
                            "node_list_bytes_per_master_cpu_s": 50_000_000}}),
            row("scale_converge_seconds", 13.0, 8.0, {"sites": sites}),
            row("scale_storm_p99_ms", 500.0, 5.0, {"p50_ms": 100.0, "p99_ms": 400.0, "readers": 15,
                                                   "replica_egress_over_working_set_per_site": 1.0}),
            row("scale_replica_egress", 1000, 1000, {}),
            row("scale_cache_throughput", cache_mb, nginx_mb, {
                "icbd": {"mb_per_cpu_s": cache_mb, "blocks_per_cpu_s": cache_mb * 0.95},
                "nginx": {"mb_per_cpu_s": nginx_mb}}),
            row("scale_replica_throughput", 550.0, 3200.0, {
                "icbd": {"mb_per_cpu_s": 550.0}, "nginx": {"mb_per_cpu_s": 3200.0}}),
        ],
    }


def test_the_model_follows_the_measured_rates():
    fast = scaling_model.tables(scaling_model.measured(_report(cache_mb=1200.0)))
    slow = scaling_model.tables(scaling_model.measured(_report(cache_mb=300.0)))
    # 1,000 boots of 500 MB in 5 minutes on 10 GbE: a slower cache server needs more of them.
    line = next(line for line in slow.splitlines() if line.startswith("| 10 GbE |"))
    assert line.split("|")[2].strip().startswith("6 ")  # 1.67 GB/s / 300 MB/s per core
    line = next(line for line in fast.splitlines() if line.startswith("| 10 GbE |"))
    assert line.split("|")[2].strip().startswith("2 ")
    assert "| master egress | 200.0 GB (100 streams) | 2.0 GB (one stream) |" in slow
    assert "1.000 (N = 2), 1.000 (N = 3)" in slow
    assert "square of the sites" in slow


def test_write_replaces_only_the_model_section(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps(_report()))
    doc = tmp_path / "SCALING.md"
    doc.write_text("# head\n\n<!-- model:begin -->\nold\n<!-- model:end -->\n\n## tail\n")
    assert scaling_model.main([str(report), "--write", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# head\n\n<!-- model:begin -->\nCalibrated on") and text.endswith("\n## tail\n")
    assert "old" not in text
    assert scaling_model.main([str(report), "--write", str(doc)]) == 0
    assert doc.read_text() == text  # the same report, the same document


def test_a_report_without_the_scale_rows_is_refused_with_one_line(tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"results": []}))
    assert scaling_model.main([str(report)]) == 1
    assert "run `icbd bench --only scale`" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["", "{", "[]"])
def test_an_unreadable_report_is_one_line(tmp_path, capsys, content):
    report = tmp_path / "report.json"
    report.write_text(content)
    assert scaling_model.main([str(report)]) == 1
    assert capsys.readouterr().err.startswith("scaling_model: ")
