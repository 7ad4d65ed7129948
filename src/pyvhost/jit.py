"""How datapath code is compiled.

Datapath functions are compiled without Numba's reference-counting runtime (``_nrt=False``): they allocate
nothing, and with the runtime on, every call that passes an array costs a pair of atomic reference-count
updates (≈30 ns) wherever Numba cannot prove them redundant -- more than the work itself.  Kernels (the entry
points called from Python) release the GIL and are cached on disk so compilation is off the user's path.
"""

from __future__ import annotations

from numba import njit


def helper(fn):
    """A compiled function called from kernels."""
    return njit(_nrt=False)(fn)


def kernel(fn):
    """A compiled entry point called from Python: no GIL, cached."""
    return njit(_nrt=False, nogil=True, cache=True)(fn)
