"""Memory-ordering primitives for compiled (Numba) code that shares memory with another agent.

Ring indices are read and written as single aligned atomic accesses, so they can neither tear nor be split,
duplicated or reordered by the compiler:

* ``load_acquire(arr, i)`` – the avail/used index: later reads of ring entries cannot move before it;
* ``store_release(arr, i, v)`` – publishing an index: earlier entry writes cannot move after it;
* ``ld*/st*`` at a byte offset of a uint8 region view – single "unordered" atomic accesses used by the copy
  path, so each guest field is read exactly once, whole;
* ``fence_full()`` – the store→load barrier needed before reading the other side's event index;
* ``eventfd_write(fd, v)`` – glibc's eventfd_write, linked by name so cached code stays valid.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _item_ptr(context, builder, aryty, ary_val, idx_val):
    ary = context.make_array(aryty)(context, builder, ary_val)
    return cgutils.get_item_pointer(context, builder, aryty, ary, [idx_val], wraparound=False)


@intrinsic
def load_acquire(typingctx, arr, idx):
    """Atomic acquire load of ``arr[idx]`` (no bounds check: ``idx`` must be in range)."""
    def codegen(context, builder, sig, args):
        ptr = _item_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.load_atomic(ptr, ordering="acquire", align=sig.args[0].dtype.bitwidth // 8)
    return arr.dtype(arr, idx), codegen


@intrinsic
def store_release(typingctx, arr, idx, val):
    """Atomic release store ``arr[idx] = val`` (single aligned store)."""
    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ptr = _item_ptr(context, builder, aryty, args[0], args[1])
        v = context.cast(builder, args[2], sig.args[2], aryty.dtype)
        builder.store_atomic(v, ptr, ordering="release", align=aryty.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.void(arr, idx, val), codegen


def _byte_ptr(context, builder, aryty, ary_val, off_val, bits):
    ary = context.make_array(aryty)(context, builder, ary_val)
    base = builder.gep(ary.data, [off_val])
    return builder.bitcast(base, ir.IntType(bits).as_pointer())


def _make_load(bits: int, ordering: str, nbtype):
    @intrinsic
    def _ld(typingctx, buf, off):
        def codegen(context, builder, sig, args):
            ptr = _byte_ptr(context, builder, sig.args[0], args[0], args[1], bits)
            return builder.load_atomic(ptr, ordering=ordering, align=bits // 8)
        return nbtype(buf, off), codegen
    return _ld


def _make_store(bits: int, ordering: str, nbtype):
    @intrinsic
    def _st(typingctx, buf, off, val):
        def codegen(context, builder, sig, args):
            ptr = _byte_ptr(context, builder, sig.args[0], args[0], args[1], bits)
            v = context.cast(builder, args[2], sig.args[2], nbtype)
            builder.store_atomic(v, ptr, ordering=ordering, align=bits // 8)
            return context.get_dummy_value()
        return types.void(buf, off, val), codegen
    return _st


# Loads/stores at an aligned byte offset of a uint8 view (callers check bounds and alignment).
ld16 = _make_load(16, "unordered", types.uint16)
ld32 = _make_load(32, "unordered", types.uint32)
ld64 = _make_load(64, "unordered", types.uint64)
ld16_acquire = _make_load(16, "acquire", types.uint16)
st16 = _make_store(16, "unordered", types.uint16)
st32 = _make_store(32, "unordered", types.uint32)
st64 = _make_store(64, "unordered", types.uint64)
st16_release = _make_store(16, "release", types.uint16)


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
def eventfd_write(typingctx, fd, val):
    """glibc ``eventfd_write(fd, val)``; returns 0 or -1."""
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(32), ir.IntType(64)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "eventfd_write")
        fdv = context.cast(builder, args[0], sig.args[0], types.int32)
        vv = context.cast(builder, args[1], sig.args[1], types.uint64)
        return builder.call(fn, [fdv, vv])
    return types.int32(fd, val), codegen
