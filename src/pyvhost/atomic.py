"""Memory-ordering primitives for compiled (Numba) code that shares memory with another agent.

Ring indices are read and written as single aligned atomic accesses, so they can neither tear nor be split,
duplicated or reordered by the compiler:

* ``load_acquire(arr, i)`` – the avail/used index (uint16 arrays): later reads of ring entries cannot move before it;
* ``store_release(arr, i, v)`` – publishing an index: earlier entry writes cannot move after it;
* ``ld*/st*`` at a byte offset of a uint8 region view – single "unordered" atomic accesses used by the copy
  path, so each guest field is read exactly once, whole;
* ``fence_full()`` – the store→load barrier needed before reading the other side's event index;
* ``or8(buf, off, v)`` – an atomic OR into one byte (the dirty log's bits), after a ``fence_release()``;
* ``xchg64(buf, off, v)`` – an atomic exchange of 8 bytes (the front-end reading and clearing the dirty log);
* ``eventfd_write(fd, v)`` – glibc's eventfd_write, linked by name so cached code stays valid.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import helper


# The intrinsics take a raw address: an array passed to an intrinsic makes Numba emit atomic reference-count
# updates around every call (~20 ns), which would dominate the datapath.  The inline wrappers below take the
# array and compute the address; they are what the rest of the code uses.
def _make_load(bits: int, ordering: str, nbtype):
    @intrinsic
    def _ld(typingctx, addr):
        def codegen(context, builder, sig, args):
            ptr = builder.inttoptr(args[0], ir.IntType(bits).as_pointer())
            return builder.load_atomic(ptr, ordering=ordering, align=bits // 8)

        return nbtype(types.intp), codegen

    return _ld


def _make_store(bits: int, ordering: str, nbtype):
    @intrinsic
    def _st(typingctx, addr, val):
        def codegen(context, builder, sig, args):
            ptr = builder.inttoptr(args[0], ir.IntType(bits).as_pointer())
            v = context.cast(builder, args[1], sig.args[1], nbtype)
            builder.store_atomic(v, ptr, ordering=ordering, align=bits // 8)
            return context.get_dummy_value()

        return types.void(types.intp, val), codegen

    return _st


_ld16 = _make_load(16, "unordered", types.uint16)
_ld32 = _make_load(32, "unordered", types.uint32)
_ld64 = _make_load(64, "unordered", types.uint64)
_ld16_acq = _make_load(16, "acquire", types.uint16)
_st16 = _make_store(16, "unordered", types.uint16)
_st32 = _make_store(32, "unordered", types.uint32)
_st64 = _make_store(64, "unordered", types.uint64)
_st16_rel = _make_store(16, "release", types.uint16)


@helper
def load_acquire(arr, i):
    """Acquire load of uint16 ``arr[i]`` (``i`` must be in range)."""
    return _ld16_acq(arr.ctypes.data + 2 * i)


@helper
def store_release(arr, i, v):
    """Release store of uint16 ``arr[i] = v`` (a single aligned store)."""
    _st16_rel(arr.ctypes.data + 2 * i, v)


# Loads/stores at an aligned byte offset of a uint8 array (callers check bounds and alignment).
@helper
def ld16(buf, off):
    return _ld16(buf.ctypes.data + off)


@helper
def ld32(buf, off):
    return _ld32(buf.ctypes.data + off)


@helper
def ld64(buf, off):
    return _ld64(buf.ctypes.data + off)


@helper
def ld16_acquire(buf, off):
    return _ld16_acq(buf.ctypes.data + off)


@helper
def st16(buf, off, v):
    _st16(buf.ctypes.data + off, v)


@helper
def st32(buf, off, v):
    _st32(buf.ctypes.data + off, v)


@helper
def st64(buf, off, v):
    _st64(buf.ctypes.data + off, v)


@helper
def st16_release(buf, off, v):
    _st16_rel(buf.ctypes.data + off, v)


@intrinsic
def fence_full(typingctx):
    """Sequentially consistent fence (mfence on x86): orders a store before a later load."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def fence_release(typingctx):
    """Release fence: earlier memory accesses stay before later stores."""

    def codegen(context, builder, sig, args):
        builder.fence("release")
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _or8(typingctx, addr, val):
    """``*(uint8 *)addr |= val`` as one atomic read-modify-write (``lock or`` on x86), relaxed (monotonic)."""

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        v = context.cast(builder, args[1], sig.args[1], types.uint8)
        builder.atomic_rmw("or", ptr, v, "monotonic")
        return context.get_dummy_value()

    return types.void(types.intp, val), codegen


@helper
def or8(buf, off, v):
    """Atomic ``buf[off] |= v`` on a uint8 array, relaxed: no bit set by another agent is lost.  Order the
    writes it stands for before it with one :func:`fence_release` (as DPDK's ``__vhost_log_write`` does)."""
    _or8(buf.ctypes.data + off, v)


@intrinsic
def _xchg64(typingctx, addr, val):
    """``old = *(uint64 *)addr; *(uint64 *)addr = val`` as one atomic read-modify-write (``xchg``), acquire
    and release (sequentially consistent)."""

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        v = context.cast(builder, args[1], sig.args[1], types.uint64)
        return builder.atomic_rmw("xchg", ptr, v, "seq_cst")

    return types.uint64(types.intp, val), codegen


@helper
def xchg64(buf, off, v):
    """Atomically swap the aligned 8 bytes at ``buf[off]`` (a uint8 array) for ``v``; return what they held.  No
    bit another agent ORs in at the same time is lost: it is either in the value returned or left in memory."""
    return _xchg64(buf.ctypes.data + off, v)


@intrinsic
def eventfd_write(typingctx, fd, val):
    """glibc ``eventfd_write(fd, val)``; returns 0 or -1."""

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(32), ir.IntType(64)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "eventfd_write")
        fdv = context.cast(builder, args[0], sig.args[0], types.int32)
        vv = context.cast(builder, args[1], sig.args[1], types.uint64)
        return builder.call(fn, [fdv, vv])

    return types.int32(fd, val), codegen


@intrinsic
def _memcpy(typingctx, dst, src, n):
    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        d = builder.inttoptr(args[0], i8p)
        sp = builder.inttoptr(args[1], i8p)
        cgutils.raw_memcpy(builder, d, sp, args[2], 1)
        return context.get_dummy_value()

    return types.void(types.intp, types.intp, types.intp), codegen


@helper
def copy_bytes(dst, dst_off, src, src_off, n):
    """``dst[dst_off:dst_off+n] = src[src_off:src_off+n]`` for uint8 arrays (caller checks the bounds)."""
    _memcpy(dst.ctypes.data + dst_off, src.ctypes.data + src_off, n)
