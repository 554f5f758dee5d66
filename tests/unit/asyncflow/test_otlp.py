"""The OpenTelemetry export: spans sent as OTLP/HTTP to a collector, here a real HTTP receiver
that decodes what arrives with OpenTelemetry's own protobuf classes."""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class Collector:
    """An OTLP/HTTP traces receiver on a free local port: every span it was sent."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        spans: list = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    service = {a.key: a.value.string_value for a in resource.resource.attributes}
                    for scope in resource.scope_spans:
                        spans.extend((service, s) for s in scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.spans = spans
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.close()


def test_spans_reach_the_collector_with_their_times_actor_and_nesting(collector):
    from asyncflow.workflow.otlp import OtlpExport

    export = OtlpExport(collector.url, service="sort-1")
    step = {"name": "step", "ph": "X", "ts": 1_000, "dur": 900, "args": {"version": 2, "row_ids": [4, 5]}}
    child = {"name": "optimizer", "ph": "X", "ts": 1_500, "dur": 100, "args": {}}
    dropped = {"name": "trace.dropped", "ph": "i", "ts": 5, "args": {}}
    export.export(
        [{"role": "trainer", "track": 2000, "name": "trainer rank 0", "events": [child, step, dropped]}]
    )
    export.close()  # flushes
    spans = {s.name: (service, s) for service, s in collector.spans}
    assert set(spans) == {"step", "optimizer"}  # an instant is no span
    service, parent = spans["step"]
    assert service["service.name"] == "asyncflow sort-1"
    assert (parent.start_time_unix_nano, parent.end_time_unix_nano) == (1_000_000, 1_900_000)
    attributes = {a.key: a.value for a in parent.attributes}
    assert attributes["asyncflow.track"].string_value == "trainer rank 0"
    assert attributes["version"].int_value == 2
    assert [v.int_value for v in attributes["row_ids"].array_value.values] == [4, 5]
    _, optimizer = spans["optimizer"]
    assert optimizer.parent_span_id == parent.span_id and optimizer.trace_id == parent.trace_id
