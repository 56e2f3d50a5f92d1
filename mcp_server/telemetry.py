"""OpenTelemetry traces: off unless the standard `OTEL_*` settings ask for them.

The spans are the existing instrumentations': the MCP SDK opens one per message (for a tool call,
`tools/call <name>` with `gen_ai.tool.name`), SQLAlchemy's opens one per statement beneath it.
This module only switches them on and adds to the tool call's span who called and how
it ended. With tracing off, nothing here costs a call more than a check of the current span.

Tracing is on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`) or an OTLP
endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), unless
`OTEL_SDK_DISABLED=true`. Everything else (sampler, resource, headers, batching) is the SDK's own
reading of its `OTEL_*` variables. A process already set up by `opentelemetry-instrument` keeps
its tracer provider.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

from mcp_server.errors import StartupError
from mcp_server.identity import Call

logger = logging.getLogger(__name__)

SERVICE_NAME = "mcp-task-server"
EXTRA_HINT = "install the telemetry extra: pip install 'mcp-task-server[telemetry]'"


def tracing() -> bool:
    """Whether spans go anywhere: a tracer provider other than the API's no-op proxy is set."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def wanted_exporters(env: Mapping[str, str]) -> list[str]:
    """The span exporters the `OTEL_*` settings in `env` ask for; none means tracing is off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not names and any(env.get(endpoint) for endpoint in endpoints):
        names = ["otlp"]
    return [name for name in names if name != "none"]


def setup(env: Mapping[str, str] = os.environ) -> bool:
    """Set up tracing as `env` asks, before the server is built; returns whether it is on."""
    if tracing():
        _instrument_databases()  # someone (opentelemetry-instrument) set up the provider already
        return True
    names = wanted_exporters(env)
    if not names:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise StartupError(f"the OTEL_* settings ask for traces: {EXTRA_HINT}") from None
    named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(resource=Resource.create({} if named else {"service.name": SERVICE_NAME}))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    trace.set_tracer_provider(provider)  # the SDK flushes it at exit
    _instrument_databases()
    logger.info("tracing on: spans go to %s", ", ".join(names))
    return True


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # One span per line, on stderr: on stdio, stdout is the protocol.
        return ConsoleSpanExporter(out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n")
    if name != "otlp":
        raise StartupError(f"OTEL_TRACES_EXPORTER: {name!r} is not supported here; use otlp, console or none")
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    if protocol in ("", "http/protobuf"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError:
            raise StartupError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc: pip install opentelemetry-exporter-otlp-proto-grpc, "
                "or use http/protobuf (the default)"
            ) from None
        return GrpcSpanExporter()
    raise StartupError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported; use http/protobuf")


def _instrument_databases() -> None:
    """Spans for SQL from SQLAlchemy's instrumentation: every statement goes through SQLAlchemy."""
    module = "opentelemetry.instrumentation.sqlalchemy"
    if importlib.util.find_spec(module) is None:
        logger.warning("no SQL spans from %s: %s", module, EXTRA_HINT)
        return
    instrumentor = importlib.import_module(module).SQLAlchemyInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        # The SQLAlchemy instrumentation declares SQLAlchemy < 2.1 and would refuse 2.1; the
        # events it listens to are unchanged, and tests/test_observability.py sees its spans.
        instrumentor.instrument(skip_dep_check=True)


def describe_call(call: Call, outcome: str) -> None:
    """Add the caller and the outcome to the span the SDK opened for this tool call."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(
            {
                "enduser.id": call.agent_id,
                "task_server.request_id": call.request_id,
                "task_server.outcome": outcome,
            }
        )
