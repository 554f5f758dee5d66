"""Read a metric sink back the way its own tools do: Prometheus' text format over HTTP, a W&B
run file; and the metric names the Grafana dashboard queries. Shared by the exporter tests
(unit) and the run tests (integration)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wandb_history(path) -> list[dict]:
    """The history rows of a W&B run file (.wandb: a LevelDB-style log of protobuf records after a
    7-byte header; records are cut into chunks at 32 KiB block boundaries)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    records, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST: a whole record
            records.append(pending)
            pending = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item  # a key with "/" may come as nested_key
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows


DASHBOARD = Path(__file__).parents[1] / "deploy" / "grafana" / "asyncflow.json"


def dashboard_metrics() -> set[str]:
    """The metric names the Grafana dashboard's expressions query (source asyncflow)."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    assert exprs and all("${source}_" in e for e in exprs), "every expression picks its source"
    return {"asyncflow_" + name for e in exprs for name in re.findall(r"\$\{source\}_([a-z0-9_]+)", e)}
