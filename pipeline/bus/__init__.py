"""The agent's NATS bus: embedded server, credentials, event publisher, stream, API and CLI.

Modules are small and single-purpose; import what you need from them directly:
:mod:`pipeline.bus.server`, :mod:`pipeline.bus.credentials`, :mod:`pipeline.bus.publish`,
:mod:`pipeline.bus.stream`, :mod:`pipeline.bus.api`, :mod:`pipeline.bus.cli`,
:mod:`pipeline.bus.schema`.
"""

from __future__ import annotations
