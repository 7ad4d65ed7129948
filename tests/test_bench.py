"""``pyvhost bench`` end to end, short: well-formed rows, packets counted, no errors.  No speed thresholds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import needs_dpdk

FIELDS = {"backend", "frontend", "direction", "metadata", "pkt_size", "queue_size", "mpps", "packets", "errors"}


def bench(tmp_path, *args: str) -> tuple[list[dict], str]:
    out = tmp_path / "rows.json"
    plot = tmp_path / "bench.png"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyvhost",
            "bench",
            "--seconds",
            "0.5",
            "--warmup",
            "0.3",
            "--runs",
            "1",
            "--json",
            str(out),
            "--plot",
            str(plot),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert plot.stat().st_size > 1000
    return json.loads(out.read_text()), p.stdout


def check(rows: list[dict]) -> None:
    for r in rows:
        assert FIELDS <= r.keys()
        assert r["packets"] > 0 and r["errors"] == 0 and r["mpps"] > 0, r


def test_bench_default(tmp_path):
    rows, table = bench(tmp_path)
    check(rows)
    assert {(r["metadata"], r["direction"]) for r in rows} == {(m, d) for m in ("copy", "direct") for d in ("tx", "rx")}
    assert all(r["backend"] == r["frontend"] == "pyvhost" for r in rows)
    assert "direct/copy" in table


@needs_dpdk
@pytest.mark.dpdk
def test_bench_peer_dpdk(tmp_path):
    rows, table = bench(tmp_path, "--peer", "dpdk")
    check(rows)
    assert {(r["backend"], r["frontend"]) for r in rows} == {
        ("dpdk", "dpdk"),
        ("pyvhost", "dpdk"),
        ("dpdk", "pyvhost"),
        ("pyvhost", "pyvhost"),
    }
    assert "pyvhost/DPDK" in table


def test_bench_ring_both(tmp_path):
    rows, table = bench(tmp_path, "--ring", "both", "--metadata", "direct")
    check(rows)
    assert {(r["ring"], r["direction"]) for r in rows} == {(g, d) for g in ("split", "packed") for d in ("tx", "rx")}
    assert "packed/split" in table


def test_bench_dirty_log_both(tmp_path):
    """Logging off and on, in pairs: the back-end logs (the front-end sees bits set) only when asked."""
    rows, table = bench(tmp_path, "--dirty-log", "both", "--metadata", "direct")
    check(rows)
    assert {(r["dirty_log"], r["direction"]) for r in rows} == {(g, d) for g in ("off", "on") for d in ("tx", "rx")}
    assert all((r["dirty_pages"] > 0) == (r["dirty_log"] == "on") for r in rows), rows
    assert "log on/off" in table


@needs_dpdk
@pytest.mark.dpdk
def test_bench_peer_dpdk_packed(tmp_path):
    rows, table = bench(tmp_path, "--peer", "dpdk", "--ring", "packed", "--metadata", "direct")
    check(rows)
    assert all(r["ring"] == "packed" for r in rows)
    assert {(r["backend"], r["frontend"]) for r in rows} == {
        ("dpdk", "dpdk"),
        ("pyvhost", "dpdk"),
        ("dpdk", "pyvhost"),
        ("pyvhost", "pyvhost"),
    }
    assert "pyvhost/DPDK" in table


@needs_dpdk
@pytest.mark.dpdk
def test_bench_like_for_like_workloads(tmp_path):
    """The reflector (testpmd flowgen through pyvhost's loopback and DPDK's io/loop), the payload-reading sink
    beside DPDK's TX, two frame sizes: every row counted, no errors, the path and ring the back-end ran, Gbit/s
    and the back-end's CPU per packet; every ratio per pair of runs."""
    rows, table = bench(
        tmp_path, "--peer", "dpdk", "--workload", "loop,tx-read", "--metadata", "direct", "--pkt-size", "64,512"
    )
    check(rows)
    seen = {(r["backend"], r["frontend"], r["direction"], r["pkt_size"]) for r in rows}
    for size in (64, 512):
        assert {
            ("dpdk", "dpdk", "loop", size),
            ("pyvhost", "dpdk", "loop", size),
            ("dpdk", "dpdk", "tx", size),
            ("pyvhost", "dpdk", "tx-read", size),
            ("dpdk", "pyvhost", "tx", size),
            ("pyvhost", "pyvhost", "tx-read", size),
        } <= seen
    for r in rows:
        assert r["gbps"] > 0 and r["cpu_s_per_mpkt"] is not None and r["cpu_s_per_mpkt"] > 0, r
        assert r["ring_ran"] == "split"
        assert r["path"] == ("direct" if r["backend"] == "pyvhost" else "-"), r
        labels = {"loop": "reflector", "tx-read": "payload read", "tx": "no payload access"}
        if r["backend"] == "dpdk":
            labels["tx"] = "frame copied to an mbuf"
        assert r["workload"] == labels[r["direction"]], r
    assert table.count("pyvhost/DPDK") == 6 and "1 pairs" in table


def test_bench_guests(tmp_path):
    """``--guests``: one row per guest count, every guest's traffic counted, the memory fields filled."""
    out = tmp_path / "guests.json"
    p = subprocess.run(
        [sys.executable, "-m", "pyvhost", "bench", "--guests", "1,3", "--metadata", "direct", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads(out.read_text())
    assert [(r["guests"], r["metadata"]) for r in rows] == [(1, "direct"), (3, "direct")]
    for r in rows:
        assert r["errors"] == 0 and r["packets"] == r["guests"] * 2000, r
        assert r["connected_mb"] > 0 and r["idle_mb"] > 0 and r["threads"] > r["guests"], r
    assert "MB/guest" in p.stdout


def test_bench_regions(tmp_path):
    """The memory-slot rows: direct and copy with the front-end's RAM in 1 and 509 regions, each ratio per pair."""
    rows, table = bench(tmp_path, "--regions", "1,509", "--workload", "tx")
    check(rows)
    assert {(r["regions"], r["metadata"]) for r in rows} == {(n, m) for n in (1, 509) for m in ("copy", "direct")}
    assert all(r["path"] == r["metadata"] for r in rows)
    assert "direct/copy" in table and "vs 1 region" in table


def test_bench_queue_pairs(tmp_path):
    """--queue-pairs 1,2: rows for one and two pairs driven at once, counted over every pair, and their ratio."""
    rows, table = bench(tmp_path, "--queue-pairs", "1,2", "--metadata", "direct")
    check(rows)
    assert {(r["queue_pairs"], r["direction"]) for r in rows} == {(q, d) for q in (1, 2) for d in ("tx", "rx")}
    assert "2 pairs/1" in table


def test_bench_scsi(tmp_path):
    """``--device scsi``: scsi on both paths and blk on the same image, every workload's requests counted without
    errors, each row with the path the back-end ran; the ratios per pair of runs."""
    rows, table = bench(tmp_path, "--device", "scsi", "--image-mb", "16", "--queue-size", "64")
    assert {(r["device"], r["metadata"]) for r in rows} == {("blk", "direct"), ("scsi", "direct"), ("scsi", "copy")}
    assert {r["workload"] for r in rows} == {"randread", "randwrite", "seqread", "seqwrite"}
    for r in rows:
        assert r["ops"] > 0 and r["errors"] == 0 and r["path"] == r["metadata"], r
        assert (r["iops"] if r["block_size"] <= 4096 else r["mbps"]) > 0, r
    assert "scsi direct/blk" in table and "scsi copy/blk" in table and "scsi direct/copy" in table


def test_table_says_the_burst_and_notes_runs_far_apart():
    """The title names the back-ends' burst; a configuration whose runs are more than 2x apart gets a note
    (the reflector's two modes), one whose runs agree does not."""
    from pyvhost.bench.net import Config, table

    def config(backend: str, rates: list[float]) -> Config:
        c = Config(backend, "dpdk", "loop", "direct" if backend == "pyvhost" else "-", pkt_size=512)
        for run, mpps in enumerate(rates, 1):
            row = c.new_row(run, 256)
            row.mpps, row.packets, row.path = mpps, 1000, c.metadata
            c.rows.append(row)
        return c

    text = table([config("dpdk", [8.0, 8.5, 7.9]), config("pyvhost", [8.9, 3.1, 9.0])], 32)
    assert "front-end: dpdk    (back-end burst: 32)" in text
    notes = [line for line in text.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "dpdk->pyvhost loop direct split 512B 2.9x" in notes[0], text
