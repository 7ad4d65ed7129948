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

from .memory import SPACE_UVA, SPACE_UVA_W, GuestMemory
from .protocol import VringAddr
from .ring import packed
from .ring.split import AVAIL_ALIGN, DESC_ALIGN, USED_ALIGN, avail_bytes, desc_bytes, used_bytes
from .ring.state import Q_AVAIL, Q_DESC, Q_DESC_AT, Q_DIRECT, Q_USED, Q_USED_AT

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

    ``direct`` is validated here, once: each part must translate whole into a single region, readable for the
    descriptor table and the avail ring, writable for the used ring (behind a vIOMMU: mapped with that
    permission by the IOTLB -- the kernel's ``vhost_vq_access_ok``).  If it does not, the ring uses ``copy``
    (which checks each access and breaks the queue at the first fault).
    """
    q[Q_DESC], q[Q_AVAIL], q[Q_USED] = addr.desc, addr.avail, addr.used
    q[Q_DESC_AT] = q[Q_USED_AT] = -1
    if mode is Metadata.DIRECT:
        d = mem.view(SPACE_UVA, addr.desc, desc_bytes(size))
        a = mem.view(SPACE_UVA, addr.avail, avail_bytes(size))
        used_at = mem.translate(SPACE_UVA_W, addr.used, used_bytes(size))
        u = None if used_at is None else mem.arena.view[used_at : used_at + used_bytes(size)]
        if d is not None and a is not None and u is not None:
            q[Q_DIRECT] = 1
            q[Q_USED_AT] = used_at
            u32_len = (used_bytes(size) - 2) // 4 * 4  # flags|idx and the entries; avail_event via used16
            return RingViews(
                d.view(np.uint64),
                a.view(np.uint16),
                u.view(np.uint16),
                u[:u32_len].view(np.uint32),
                True,
                mem.generation,
            )
        # behind a vIOMMU a part not yet in the IOTLB is normal: the first access asks for it (MISS)
        (log.info if mem.iova_map is not None else log.warning)(
            "ring at desc=%#x avail=%#x used=%#x (size %d) does not lie in mapped memory; using the copy path",
            addr.desc,
            addr.avail,
            addr.used,
            size,
        )
    q[Q_DIRECT] = 0
    return RingViews(_NO_U64, _NO_U16, _NO_U16, _NO_U32, False, mem.generation)


def bind_packed(mem: GuestMemory, addr: VringAddr, size: int, mode: Metadata, q: np.ndarray) -> PackedViews:
    """:func:`bind` for a packed ring: the descriptor ring (readable and writable) and both event suppression
    areas (the driver's readable, the device's writable) must each lie whole in one region for ``direct``;
    otherwise the ring uses ``copy``."""
    q[Q_DESC], q[Q_AVAIL], q[Q_USED] = addr.desc, addr.avail, addr.used
    q[Q_DESC_AT] = q[Q_USED_AT] = -1
    if mode is Metadata.DIRECT:
        nbytes = packed.ring_bytes(size)
        desc_at = mem.translate(SPACE_UVA, addr.desc, nbytes)
        if desc_at is not None and mem.translate(SPACE_UVA_W, addr.desc, nbytes) != desc_at:
            desc_at = None
        dev_at = mem.translate(SPACE_UVA_W, addr.used, packed.EVENT_BYTES)
        d = None if desc_at is None else mem.arena.view[desc_at : desc_at + nbytes]
        drv = mem.view(SPACE_UVA, addr.avail, packed.EVENT_BYTES)
        dev = None if dev_at is None else mem.arena.view[dev_at : dev_at + packed.EVENT_BYTES]
        if d is not None and drv is not None and dev is not None:
            q[Q_DIRECT] = 1
            q[Q_DESC_AT], q[Q_USED_AT] = desc_at, dev_at
            return PackedViews(d.view(np.uint64), drv.view(np.uint16), dev.view(np.uint16), True, mem.generation)
        # behind a vIOMMU a part not yet in the IOTLB is normal: the first access asks for it (MISS)
        (log.info if mem.iova_map is not None else log.warning)(
            "packed ring at desc=%#x driver=%#x device=%#x (size %d) does not lie in mapped memory; "
            "using the copy path",
            addr.desc,
            addr.avail,
            addr.used,
            size,
        )
    q[Q_DIRECT] = 0
    return PackedViews(_NO_U64, _NO_U16, _NO_U16, False, mem.generation)
