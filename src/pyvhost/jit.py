"""How datapath code is compiled.

Datapath functions are compiled without Numba's reference-counting runtime (``_nrt=False``): they allocate
nothing, and with the runtime on, every call that passes an array costs a pair of atomic reference-count
updates (≈30 ns) wherever Numba cannot prove them redundant -- more than the work itself.  Kernels (the entry
points called from Python) release the GIL and are cached on disk so compilation is off the user's path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba
from numba import njit


def _cache_dir() -> str:
    """Numba re-validates a cached kernel against its own file only, not against the helpers it inlined from
    other modules; keying the cache directory by a hash of every pyvhost source makes any change rebuild."""
    h = hashlib.sha256(numba.__version__.encode())
    for f in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(f.read_bytes())
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pyvhost"
    return str(base / f"numba-{h.hexdigest()[:16]}")


if not os.environ.get("NUMBA_CACHE_DIR"):
    numba.config.CACHE_DIR = _cache_dir()  # type: ignore[attr-defined]  # set at run time by numba


def helper(fn):
    """A compiled function called from kernels."""
    return njit(_nrt=False)(fn)


def inline_helper(fn):
    """A compiled function inlined into its callers at the Numba IR level (hot, called once per packet)."""
    return njit(_nrt=False, inline="always")(fn)


def kernel(fn):
    """A compiled entry point called from Python: no GIL, cached."""
    return njit(_nrt=False, nogil=True, cache=True)(fn)
