"""Generic binding to libbpf (cffi ABI mode): objects, programs, maps, ring buffers, links."""

from __future__ import annotations

from loaders import bpffs, cgroup, errors
from loaders.links import Link
from loaders.maps import Map
from loaders.object import BpfObject, Program
from loaders.ringbuf import RingBuffer, wait_readable

__all__ = [
    "BpfObject",
    "Link",
    "Map",
    "Program",
    "RingBuffer",
    "bpffs",
    "cgroup",
    "errors",
    "wait_readable",
]
