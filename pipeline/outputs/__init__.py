"""Outputs: NATS subscribers that turn published events into an audit log and OpenTelemetry data.

Each output consumes ``tool.events.>`` on its own and is started explicitly by the
pipeline's stage graph (see :func:`pipeline.outputs.audit.run_audit` and
:func:`pipeline.outputs.otel.run_otel`); importing this package has no side effects.
"""
