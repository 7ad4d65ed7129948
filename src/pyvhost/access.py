"""Metadata access strategies: how the compiled loop reaches a ring's descriptor table, avail and used rings.

``copy``   every access translates the ring's front-end address through the memory table and checks the bounds
           (the reference semantics; vhost's copy_user()/get_user() path).
``direct`` the ring is validated once -- each part must lie whole in one region, aligned -- and typed NumPy views
           of the mapping are kept; the loop indexes them with ring indices masked to the queue size.

Views are bound to one memory generation.  The backend drops them (after stopping the ring's worker) whenever
the memory table, the ring addresses or the owner change, and builds new ones with :func:`bind`.  A ring that
cannot be mapped directly falls back to ``copy``, which then reports the precise fault at the first access.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import numpy as np

from .memory import SPACE_UVA, GuestMemory
from .protocol import VringAddr
from .ring import packed
from .ring.split import AVAIL_ALIGN, DESC_ALIGN, USED_ALIGN, avail_bytes, desc_bytes, used_bytes
from .ring.state import Q_AVAIL, Q_DESC, Q_DIRECT, Q_USED

log = logging.getLogger(__name__)


class Metadata(str, enum.Enum):
    COPY = "copy"
    DIRECT = "direct"


# Typed placeholders for the copy path (the compiled loop never indexes them when q[Q_DIRECT] == 0).
_NO_U64 = np.zeros(0, dtype=np.uint64)
_NO_U16 = np.zeros(0, dtype=np.uint16)
_NO_U32 = np.zeros(0, dtype=np.uint32)


@dataclass
class RingViews:
    """What the compiled loop gets for one split ring in one memory generation."""

    desc: np.ndarray  # uint64, 2 words per descriptor
    avail: np.ndarray  # uint16: flags, idx, ring[size], used_event
    used16: np.ndarray  # uint16: flags, idx, ..., avail_event at 2 + 4*size
    used32: np.ndarray  # uint32: (flags|idx), then id, len per entry
    direct: bool
    generation: int

    def args(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.desc, self.avail, self.used16, self.used32


@dataclass
class PackedViews:
    """What the compiled loop gets for one packed ring in one memory generation."""

    desc: np.ndarray  # uint64, 2 words per descriptor
    driver: np.ndarray  # uint16: off_wrap, flags of the driver's event suppression area (read here)
    device: np.ndarray  # uint16: off_wrap, flags of the device's event suppression area (written here)
    direct: bool
    generation: int

    def args(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.desc, self.driver, self.device


def check_alignment(addr: VringAddr, is_packed: bool = False) -> str | None:
    """The virtio alignment rules for split (or packed) rings; a text saying what is wrong, or None."""
    parts = (
        (
            ("descriptor table", addr.desc, DESC_ALIGN),
            ("avail ring", addr.avail, AVAIL_ALIGN),
            ("used ring", addr.used, USED_ALIGN),
        )
        if not is_packed
        else (
            ("descriptor ring", addr.desc, packed.DESC_ALIGN),
            ("driver area", addr.avail, packed.EVENT_ALIGN),
            ("device area", addr.used, packed.EVENT_ALIGN),
        )
    )
    for name, value, align in parts:
        if value % align:
            return f"{name} address {value:#x} is not {align}-byte aligned"
    return None


def bind(mem: GuestMemory, addr: VringAddr, size: int, mode: Metadata, q: np.ndarray) -> RingViews:
    """Build the ring's access for the current memory generation and record the choice in ``q``.

    ``direct`` is validated here, once: each part must translate whole into a single region.  If it does
    not, the ring uses ``copy`` (which checks each access and breaks the queue at the first fault).
    """
    q[Q_DESC], q[Q_AVAIL], q[Q_USED] = addr.desc, addr.avail, addr.used
    if mode is Metadata.DIRECT:
        d = mem.view(SPACE_UVA, addr.desc, desc_bytes(size))
        a = mem.view(SPACE_UVA, addr.avail, avail_bytes(size))
        u = mem.view(SPACE_UVA, addr.used, used_bytes(size))
        if d is not None and a is not None and u is not None:
            q[Q_DIRECT] = 1
            u32_len = (used_bytes(size) - 2) // 4 * 4  # flags|idx and the entries; avail_event via used16
            return RingViews(
                d.view(np.uint64),
                a.view(np.uint16),
                u.view(np.uint16),
                u[:u32_len].view(np.uint32),
                True,
                mem.generation,
            )
        log.warning(
            "ring at desc=%#x avail=%#x used=%#x (size %d) does not lie in mapped memory; using the copy path",
            addr.desc,
            addr.avail,
            addr.used,
            size,
        )
    q[Q_DIRECT] = 0
    return RingViews(_NO_U64, _NO_U16, _NO_U16, _NO_U32, False, mem.generation)


def bind_packed(mem: GuestMemory, addr: VringAddr, size: int, mode: Metadata, q: np.ndarray) -> PackedViews:
    """:func:`bind` for a packed ring: the descriptor ring and both event suppression areas must each lie whole
    in one region for ``direct``; otherwise the ring uses ``copy``."""
    q[Q_DESC], q[Q_AVAIL], q[Q_USED] = addr.desc, addr.avail, addr.used
    if mode is Metadata.DIRECT:
        d = mem.view(SPACE_UVA, addr.desc, packed.ring_bytes(size))
        drv = mem.view(SPACE_UVA, addr.avail, packed.EVENT_BYTES)
        dev = mem.view(SPACE_UVA, addr.used, packed.EVENT_BYTES)
        if d is not None and drv is not None and dev is not None:
            q[Q_DIRECT] = 1
            return PackedViews(d.view(np.uint64), drv.view(np.uint16), dev.view(np.uint16), True, mem.generation)
        log.warning(
            "packed ring at desc=%#x driver=%#x device=%#x (size %d) does not lie in mapped memory; "
            "using the copy path",
            addr.desc,
            addr.avail,
            addr.used,
            size,
        )
    q[Q_DIRECT] = 0
    return PackedViews(_NO_U64, _NO_U16, _NO_U16, False, mem.generation)
