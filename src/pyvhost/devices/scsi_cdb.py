"""SCSI commands of a direct-access block device (SPC-4, SBC-3): CDB fields, sense data, the emulated commands.

What a CDB asks for is decoded here (:func:`decode_rw`, :func:`decode_unmap`, :func:`decode_write_same`) and
the data the commands without I/O return is built here (INQUIRY and its VPD pages, READ CAPACITY, MODE SENSE,
REPORT LUNS, REQUEST SENSE).  A command the unit refuses raises :class:`Sense`: CHECK CONDITION with fixed-format
sense data (response code 0x70) carrying the sense key and ASC/ASCQ the specs name.  Nothing here touches a file
or guest memory; ``scsi.py`` does the I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# -- status (SAM-5) -----------------------------------------------------------------------------------------
GOOD = 0x00
CHECK_CONDITION = 0x02

# -- operation codes (SPC-4 / SBC-3) ------------------------------------------------------------------------
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
INQUIRY = 0x12
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
VERIFY_10 = 0x2F
SYNCHRONIZE_CACHE_10 = 0x35
WRITE_SAME_10 = 0x41
UNMAP = 0x42
MODE_SENSE_10 = 0x5A
READ_16 = 0x88
WRITE_16 = 0x8A
SYNCHRONIZE_CACHE_16 = 0x91
WRITE_SAME_16 = 0x93
SERVICE_ACTION_IN_16 = 0x9E
SAI_READ_CAPACITY_16 = 0x10
REPORT_LUNS = 0xA0

#: CDB length of each group (the top three bits of the operation code)
CDB_GROUP_LEN = (6, 10, 10, 0, 16, 12, 0, 0)

# -- sense keys and additional sense codes (SPC-4 4.5.6, annex D) ------------------------------------------
NO_SENSE = 0x0
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
ABORTED_COMMAND = 0xB

ASC_NONE = (0x00, 0x00)
ASC_WRITE_ERROR = (0x0C, 0x00)
ASC_UNRECOVERED_READ_ERROR = (0x11, 0x00)
ASC_PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
ASC_INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
ASC_LBA_OUT_OF_RANGE = (0x21, 0x00)
ASC_INVALID_FIELD_IN_CDB = (0x24, 0x00)
ASC_LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
ASC_INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
ASC_WRITE_PROTECTED = (0x27, 0x00)
ASC_SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
ASC_INTERNAL_TARGET_FAILURE = (0x44, 0x00)

SENSE_FIXED_CURRENT = 0x70
SENSE_FIXED_LEN = 18

# -- INQUIRY ------------------------------------------------------------------------------------------------
TYPE_DISK = 0x00
#: peripheral qualifier 3, type 0x1f: no logical unit at this LUN (SPC-4 6.6.2)
TYPE_NO_LUN = 0x7F
VERSION_SPC4 = 0x06
VPD_SUPPORTED_PAGES = 0x00
VPD_UNIT_SERIAL = 0x80
VPD_DEVICE_ID = 0x83
VPD_BLOCK_LIMITS = 0xB0
VPD_BLOCK_CHARACTERISTICS = 0xB1
VPD_LB_PROVISIONING = 0xB2
VENDOR = b"PYVHOST "
PRODUCT = b"pyvhost disk    "
REVISION = b"1.0 "

# -- MODE SENSE ---------------------------------------------------------------------------------------------
MODE_PAGE_RW_ERROR_RECOVERY = 0x01
MODE_PAGE_CACHING = 0x08
MODE_PAGE_CONTROL = 0x0A
MODE_PAGE_ALL = 0x3F
PC_CURRENT, PC_CHANGEABLE, PC_DEFAULT, PC_SAVED = 0, 1, 2, 3
MODE_WP = 0x80  # device-specific parameter: write protected
MODE_DPOFUA = 0x10  # device-specific parameter: DPO and FUA supported

UNMAP_DESCRIPTOR = struct.Struct(">QI4x")
UNMAP_HEADER = 8


class Sense(Exception):
    """CHECK CONDITION: the command failed with this sense key and ASC/ASCQ."""

    def __init__(self, key: int, asc: tuple[int, int], why: str = "") -> None:
        super().__init__(why or f"sense key {key:#x}, ASC/ASCQ {asc[0]:02x}/{asc[1]:02x}")
        self.key = key
        self.asc = asc

    def data(self) -> bytes:
        return fixed_sense(self.key, self.asc)


def fixed_sense(key: int, asc: tuple[int, int]) -> bytes:
    """Fixed-format sense data (SPC-4 4.5.3), current error, 18 bytes."""
    b = bytearray(SENSE_FIXED_LEN)
    b[0] = SENSE_FIXED_CURRENT
    b[2] = key & 0x0F
    b[7] = SENSE_FIXED_LEN - 8  # additional sense length
    b[12], b[13] = asc
    return bytes(b)


def illegal(asc: tuple[int, int], why: str) -> Sense:
    return Sense(ILLEGAL_REQUEST, asc, why)


@dataclass
class UnitInfo:
    """What the emulated commands report about one logical unit."""

    blocks: int
    block_size: int = 512
    readonly: bool = False
    serial: bytes = b""
    #: at most this many blocks per READ/WRITE (Block Limits VPD)
    max_transfer: int = 0xFFFF
    #: UNMAP limits (Block Limits VPD); thin provisioning (LBPME, UNMAP) only on a writable unit
    max_unmap_blocks: int = (1 << 22) - 1
    max_unmap_descriptors: int = 32
    max_write_same: int = (1 << 22) - 1
    write_cache: bool = True

    @property
    def provisioning(self) -> bool:
        return not self.readonly


def cdb_length(opcode: int) -> int:
    return CDB_GROUP_LEN[opcode >> 5]


def _alloc(data: bytes, length: int) -> bytes:
    """The first ``length`` bytes: what an allocation length lets through."""
    return data[:length]


# -- INQUIRY ------------------------------------------------------------------------------------------------
def inquiry(cdb: bytes, unit: UnitInfo | None) -> bytes:
    """INQUIRY (SPC-4 6.6): standard data or a VPD page; ``unit`` None: no logical unit at this LUN."""
    evpd, page, alloc = cdb[1] & 1, cdb[2], int.from_bytes(cdb[3:5], "big")
    if cdb[1] & 0xFE:
        raise illegal(ASC_INVALID_FIELD_IN_CDB, f"INQUIRY byte 1 {cdb[1]:#x}")
    if not evpd:
        if page:
            raise illegal(ASC_INVALID_FIELD_IN_CDB, f"INQUIRY page {page:#x} without EVPD")
        std = bytearray(36)
        std[0] = TYPE_DISK if unit is not None else TYPE_NO_LUN
        std[2] = VERSION_SPC4
        std[3] = 0x12  # HISUP, response data format 2
        std[4] = len(std) - 5
        std[7] = 0x02  # CMDQUE
        std[8:16], std[16:32], std[32:36] = VENDOR, PRODUCT, REVISION
        return _alloc(bytes(std), alloc)
    if unit is None:
        raise Sense(ILLEGAL_REQUEST, ASC_LOGICAL_UNIT_NOT_SUPPORTED, "VPD page of a LUN with no unit")
    return _alloc(vpd_page(page, unit), alloc)


def vpd_pages(unit: UnitInfo) -> list[int]:
    pages = [VPD_SUPPORTED_PAGES, VPD_UNIT_SERIAL, VPD_DEVICE_ID, VPD_BLOCK_LIMITS, VPD_BLOCK_CHARACTERISTICS]
    if unit.provisioning:
        pages.append(VPD_LB_PROVISIONING)
    return pages


def vpd_page(page: int, unit: UnitInfo) -> bytes:
    if page not in vpd_pages(unit):
        raise illegal(ASC_INVALID_FIELD_IN_CDB, f"VPD page {page:#x}")
    if page == VPD_SUPPORTED_PAGES:
        body = bytes(vpd_pages(unit))
    elif page == VPD_UNIT_SERIAL:
        body = unit.serial
    elif page == VPD_DEVICE_ID:
        ident = VENDOR + unit.serial  # T10 vendor ID designator, ASCII, associated with the logical unit
        body = bytes([0x02, 0x01, 0x00, len(ident)]) + ident
    elif page == VPD_BLOCK_LIMITS:
        b = bytearray(60)
        b[0] = 0x01  # WSNZ: WRITE SAME with 0 blocks is refused
        struct.pack_into(">HI", b, 2, 1, unit.max_transfer)  # optimal granularity, maximum transfer length
        if unit.provisioning:
            struct.pack_into(
                ">IIII", b, 16, unit.max_unmap_blocks, unit.max_unmap_descriptors, 8, 0
            )  # max unmap LBA count, max unmap descriptors, optimal unmap granularity (4 KiB), alignment
            struct.pack_into(">Q", b, 32, unit.max_write_same)
        body = bytes(b)
    elif page == VPD_BLOCK_CHARACTERISTICS:
        b = bytearray(60)
        struct.pack_into(">H", b, 0, 1)  # medium rotation rate 1: non-rotating
        body = bytes(b)
    else:  # VPD_LB_PROVISIONING
        body = bytes([0, 0x80 | 0x40 | 0x20, 0x02, 0])  # LBPU, LBPWS, LBPWS10; thin provisioned
    return bytes([TYPE_DISK, page]) + struct.pack(">H", len(body)) + body


# -- capacity, mode pages, LUNs ---------------------------------------------------------------------------
def read_capacity_10(cdb: bytes, unit: UnitInfo) -> bytes:
    last = unit.blocks - 1
    return struct.pack(">II", min(last, 0xFFFFFFFF), unit.block_size)


def read_capacity_16(cdb: bytes, unit: UnitInfo) -> bytes:
    alloc = int.from_bytes(cdb[10:14], "big")
    b = bytearray(32)
    struct.pack_into(">QI", b, 0, unit.blocks - 1, unit.block_size)
    if unit.provisioning:
        b[14] = 0x80 | 0x40  # LBPME; LBPRZ: unmapped blocks read as zeros (holes punched in the file)
    return _alloc(bytes(b), alloc)


def _mode_page(page: int, pc: int, unit: UnitInfo) -> bytes:
    if page == MODE_PAGE_RW_ERROR_RECOVERY:
        b = bytearray(12)
        b[0], b[1] = page, 10
        return bytes(b)
    if page == MODE_PAGE_CACHING:
        b = bytearray(20)
        b[0], b[1] = page, 18
        if pc != PC_CHANGEABLE and unit.write_cache:
            b[2] = 0x04  # WCE: write-back; SYNCHRONIZE CACHE makes writes durable
        return bytes(b)
    if page == MODE_PAGE_CONTROL:
        b = bytearray(12)
        b[0], b[1] = page, 10
        return bytes(b)
    raise illegal(ASC_INVALID_FIELD_IN_CDB, f"mode page {page:#x}")


def mode_sense(cdb: bytes, unit: UnitInfo) -> bytes:
    """MODE SENSE(6) or (10) (SPC-4 6.11, 6.12): header, a short-LBA block descriptor unless DBD, the pages."""
    ten = cdb[0] == MODE_SENSE_10
    dbd = cdb[1] & 0x08
    pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    alloc = int.from_bytes(cdb[7:9], "big") if ten else cdb[4]
    if pc == PC_SAVED:
        raise illegal(ASC_SAVING_PARAMETERS_NOT_SUPPORTED, "saved mode pages")
    if subpage and not (page == MODE_PAGE_ALL and subpage == 0xFF):
        raise illegal(ASC_INVALID_FIELD_IN_CDB, f"mode subpage {subpage:#x}")
    if page == MODE_PAGE_ALL:
        pages = b"".join(
            _mode_page(p, pc, unit) for p in (MODE_PAGE_RW_ERROR_RECOVERY, MODE_PAGE_CACHING, MODE_PAGE_CONTROL)
        )
    else:
        pages = _mode_page(page, pc, unit)
    block = b"" if dbd else struct.pack(">I", min(unit.blocks, 0xFFFFFF)) + struct.pack(">I", unit.block_size)
    specific = MODE_DPOFUA | (MODE_WP if unit.readonly else 0)
    if ten:
        n = 8 + len(block) + len(pages)
        head = struct.pack(">HBBBBH", n - 2, 0, specific, 0, 0, len(block))
    else:
        n = 4 + len(block) + len(pages)
        head = bytes([n - 1, 0, specific, len(block)])
    return _alloc(head + block + pages, alloc)


def report_luns(cdb: bytes, luns: list[int]) -> bytes:
    """REPORT LUNS (SPC-4 6.33): the LUN inventory, single-level, peripheral (< 256) or flat addressing."""
    alloc = int.from_bytes(cdb[6:10], "big")
    if cdb[2] not in (0x00, 0x01, 0x02):
        raise illegal(ASC_INVALID_FIELD_IN_CDB, f"REPORT LUNS select report {cdb[2]:#x}")
    if alloc < 16:
        raise illegal(ASC_INVALID_FIELD_IN_CDB, f"REPORT LUNS allocation length {alloc}")
    entries = b"".join(lun_entry(n) for n in sorted(luns)) if cdb[2] != 0x01 else b""
    return _alloc(struct.pack(">I4x", len(entries)) + entries, alloc)


def lun_entry(lun: int) -> bytes:
    """An 8-byte LUN: peripheral device addressing below 256, flat space addressing above (SAM-5 4.7)."""
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    return bytes([0x40 | (lun >> 8), lun & 0xFF]) + bytes(6)


def request_sense(cdb: bytes) -> bytes:
    if cdb[1] & 0x01:
        raise illegal(ASC_INVALID_FIELD_IN_CDB, "descriptor-format sense")
    return _alloc(fixed_sense(NO_SENSE, ASC_NONE), cdb[4])


# -- commands that move data ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transfer:
    """A READ or WRITE: ``blocks`` logical blocks at ``lba``; ``fua``: written through before GOOD."""

    lba: int
    blocks: int
    write: bool
    fua: bool


def decode_rw(cdb: bytes, unit: UnitInfo) -> Transfer:
    """READ/WRITE(10/16) (SBC-3 5.11-5.14, 5.32-5.35), range-checked against the unit."""
    op = cdb[0]
    if op in (READ_10, WRITE_10):
        lba, blocks = int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
    else:
        lba, blocks = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
    write = op in (WRITE_10, WRITE_16)
    if cdb[1] & 0xE0:
        raise illegal(ASC_INVALID_FIELD_IN_CDB, f"{'WR' if write else 'RD'}PROTECT {cdb[1] >> 5} (no protection)")
    check_range(lba, blocks, unit)
    if blocks > unit.max_transfer:
        raise illegal(ASC_INVALID_FIELD_IN_CDB, f"transfer of {blocks} blocks, at most {unit.max_transfer}")
    return Transfer(lba, blocks, write, bool(cdb[1] & 0x08))


def check_range(lba: int, blocks: int, unit: UnitInfo) -> None:
    if lba + blocks > unit.blocks:
        raise illegal(ASC_LBA_OUT_OF_RANGE, f"blocks {lba}+{blocks} beyond the capacity {unit.blocks}")


def decode_unmap(cdb: bytes, params: bytes, unit: UnitInfo) -> list[tuple[int, int]]:
    """UNMAP (SBC-3 5.28): the (lba, blocks) ranges of its parameter list, each checked."""
    if cdb[1] & 0x01:
        raise illegal(ASC_INVALID_FIELD_IN_CDB, "UNMAP ANCHOR")
    if not params:
        return []
    if len(params) < UNMAP_HEADER:
        raise illegal(ASC_PARAMETER_LIST_LENGTH_ERROR, f"UNMAP parameter list of {len(params)} bytes")
    data_len, desc_len = struct.unpack_from(">HH", params)
    if data_len + 2 > len(params) or desc_len + UNMAP_HEADER > len(params) or desc_len % UNMAP_DESCRIPTOR.size:
        raise illegal(ASC_PARAMETER_LIST_LENGTH_ERROR, f"UNMAP lengths {data_len}/{desc_len} in {len(params)} bytes")
    count = desc_len // UNMAP_DESCRIPTOR.size
    if count > unit.max_unmap_descriptors:
        raise illegal(ASC_INVALID_FIELD_IN_PARAMETER_LIST, f"{count} UNMAP descriptors")
    ranges = []
    for lba, blocks in UNMAP_DESCRIPTOR.iter_unpack(params[UNMAP_HEADER : UNMAP_HEADER + desc_len]):
        if blocks > unit.max_unmap_blocks:
            raise illegal(ASC_INVALID_FIELD_IN_PARAMETER_LIST, f"UNMAP of {blocks} blocks")
        check_range(lba, blocks, unit)
        if blocks:
            ranges.append((lba, blocks))
    return ranges


@dataclass(frozen=True)
class WriteSame:
    lba: int
    blocks: int
    unmap: bool
    #: no data-out buffer: the block is zeros (WRITE SAME(16) NDOB)
    ndob: bool


def decode_write_same(cdb: bytes, unit: UnitInfo) -> WriteSame:
    """WRITE SAME(10/16) (SBC-3 5.41, 5.42)."""
    if cdb[0] == WRITE_SAME_10:
        lba, blocks, ndob = int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big"), False
    else:
        lba, blocks, ndob = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big"), bool(cdb[1] & 1)
    if cdb[1] & 0xE6:  # WRPROTECT, ANCHOR, PBDATA/LBDATA (obsolete)
        raise illegal(ASC_INVALID_FIELD_IN_CDB, f"WRITE SAME byte 1 {cdb[1]:#x}")
    if blocks == 0 or blocks > unit.max_write_same:
        raise illegal(ASC_INVALID_FIELD_IN_CDB, f"WRITE SAME of {blocks} blocks")
    check_range(lba, blocks, unit)
    return WriteSame(lba, blocks, bool(cdb[1] & 0x08), ndob)
