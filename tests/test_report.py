"""Report: ordering, depth aggregation, top, rich table, JSON/CSV with exact bytes, totals formula."""

import csv
import io
import json

import pytest

from aalconvert.errors import ConversionError
from aalconvert.report import Report, Row, Totals, format_bytes, optimizer_state_factor
from aalconvert.trace import Untraced

KiB = 1024


def make_report() -> Report:
    rows = [
        Row("layer1.0.conv1", "Conv2d", (4, 16, 8, 8), "fp32", 16 * KiB, 0, "ara",
            "weight gradient uses the group anchor"),
        Row("layer1.0.relu", "ReLU", (4, 16, 8, 8), "fp32", 16 * KiB, 512, "exact", "1-bit mask"),
        Row("layer1.1.bn1", "BatchNorm2d", (4, 16, 8, 8), "fp32", 16 * KiB + 128, 16 * KiB + 128, "",
            "kept as is: no rule converts BatchNorm2d"),
        Row("stem", "Conv2d", (4, 16, 16, 16), "fp32", 3 * 1024 * KiB, 1024 * KiB, "approx4", "4-bit copy"),
        Row("", "Net", (4, 10), "fp32", 160, 160, "", "functional ops in <root> (not rewritten)"),
    ]
    rows.sort(key=lambda r: (-r.bytes_saved, -r.bytes_bp, r.name))
    totals = Totals(
        bp_bytes=sum(r.bytes_bp for r in rows), converted_bytes=sum(r.bytes_converted for r in rows),
        parameter_bytes=1000, gradient_bytes=800, optimizer="adamw", optimizer_state_bytes=1600,
        largest_transient_bytes=64,
    )
    info = {"layer1": ("Sequential", (4, 16, 8, 8), "fp32"), "layer1.0": ("BasicBlock", (4, 16, 8, 8), "fp32"),
            "layer1.1": ("BasicBlock", (4, 16, 8, 8), "fp32")}
    untraced = [Untraced("layer2", "Odd", "TraceError: symbolically traced variables cannot be used")]
    return Report("Net", ["ara", "exact", "approx4"], rows, totals, untraced, "fake tensors",
                  ["a note"], info)


def test_format_bytes_picks_binary_units():
    assert [format_bytes(n) for n in (0, 1023, 1024, 1536, 5 * 1024 ** 2, 3 * 1024 ** 3, -2048)] == \
        ["0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB", "-2.0 KiB"]


def test_totals_ratio_and_peak_follow_the_formula():
    t = make_report().totals
    assert t.ratio == pytest.approx(t.converted_bytes / t.bp_bytes)
    assert t.peak_bp_bytes == 1000 + 800 + 1600 + t.bp_bytes + 64
    assert t.peak_converted_bytes == 1000 + 800 + 1600 + t.converted_bytes + 64
    assert Totals(0, 0, 0, 0, None, 0, 0).ratio == 1.0


@pytest.mark.parametrize("name, factor", [(None, 0), ("sgd", 0), ("sgd_momentum", 1), ("adam", 2), ("adamw", 2)])
def test_optimizer_state_factor_per_optimizer(name, factor):
    assert optimizer_state_factor(name) == factor


def test_unknown_optimizer_lists_the_allowed_ones():
    with pytest.raises(ConversionError, match="adamw"):
        optimizer_state_factor("lion")


def test_depth_aggregation_sums_bytes_by_name_prefix_and_keeps_totals():
    report = make_report()
    by_depth = {row.name: row for row in report.aggregated(depth=1)}
    assert set(by_depth) == {"", "layer1", "stem"}
    layer1 = by_depth["layer1"]
    assert layer1.bytes_bp == 48 * KiB + 128
    assert layer1.bytes_converted == 512 + 16 * KiB + 128
    assert (layer1.op, layer1.rule, layer1.explanation) == ("Sequential", "ara, exact", "3 modules under layer1")
    assert sum(r.bytes_bp for r in by_depth.values()) == report.totals.bp_bytes
    depth2 = {row.name for row in report.aggregated(depth=2)}
    assert depth2 == {"", "layer1.0", "layer1.1", "stem"}
    assert [r.name for r in report.aggregated()] == [r.name for r in report.rows]


def test_rows_are_sorted_by_bytes_saved():
    saved = [row.bytes_saved for row in make_report().aggregated(depth=1)]
    assert saved == sorted(saved, reverse=True)


def render(report: Report, **options) -> str:
    buffer = io.StringIO()
    report.print(file=buffer, **options)
    return buffer.getvalue()


def test_print_shows_the_biggest_saving_first_then_totals_untraced_and_notes():
    text = render(make_report())
    lines = [line for line in text.splitlines() if "│" in line]
    assert "stem" in lines[0] and "2.0 MiB" in lines[0]  # 3 MiB kept under BP, 1 MiB converted
    assert "predicted peak, converted" in text and "adamw" in text
    assert "untraced: layer2 (Odd)" in text and "note: a note" in text


def test_print_top_cuts_rows_and_says_how_many_are_hidden():
    text = render(make_report(), top=2)
    assert "layer1.1.bn1" not in text and "3 more rows not shown" in text
    with pytest.raises(ConversionError, match="top"):
        render(make_report(), top=0)


def test_json_has_exact_bytes_and_the_documented_schema():
    data = json.loads(make_report().to_json())
    assert set(data) == {"model", "rules", "estimated_on", "notes", "totals", "rows", "untraced"}
    assert data["rules"] == ["ara", "exact", "approx4"]
    row = data["rows"][0]
    assert row == {"name": "stem", "op": "Conv2d", "output_shape": [4, 16, 16, 16], "dtype": "fp32",
                   "bytes_bp": 3 * 1024 * KiB, "bytes_converted": 1024 * KiB, "bytes_saved": 2 * 1024 * KiB,
                   "rule": "approx4", "explanation": "4-bit copy"}
    totals = data["totals"]
    for key in ("bp_bytes", "converted_bytes", "parameter_bytes", "gradient_bytes", "optimizer_state_bytes",
                "largest_transient_bytes", "peak_bp_bytes", "peak_converted_bytes"):
        assert isinstance(totals[key], int), key
    assert isinstance(totals["ratio"], float) and totals["optimizer"] == "adamw"
    assert data["untraced"] == [{"name": "layer2", "type": "Odd",
                                 "reason": "TraceError: symbolically traced variables cannot be used"}]


def test_csv_parses_back_to_the_rows():
    report = make_report()
    records = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [r["name"] for r in records] == [row.name for row in report.rows]
    first = records[0]
    assert first["output_shape"] == "4x16x16x16"
    assert int(first["bytes_saved"]) == report.rows[0].bytes_saved
    assert (records[-1]["name"], records[-1]["rule"]) == ("", "")
