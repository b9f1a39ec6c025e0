"""Memory pages for the weight arena (Linux): faulted in at load, promoted to 2 MiB pages after it.

A decode step streams every weight, and with 4 KiB pages each page costs a TLB miss: weights in 2 MiB pages
decode ~7% faster on the project's 2-core VM (SmolLM2 Q4_1: 215-227 -> 232-246 tokens/s). Asking for 2 MiB
pages at load time, though, makes the load wait for them: on that VM a fresh process's first 400 MB of huge pages
took 0.04-0.92 s to fault in (no compaction stalls were counted: likely the hypervisor backing them), against
0.12-0.13 s in 4 KiB pages. So the arena is faulted in small pages, filled, and then collapsed into huge pages by a
background thread while the model is already usable (MADV_COLLAPSE, Linux 6.1+). The thread keeps the ordinary
priority: at the lowest one (nice 19) a decode started right away starved it, and a 1B file's 666 MiB took ~6 s
of slower decoding to collapse; at the ordinary one they are collapsed during the first 64 tokens (1B Q4_K_M
shapes: 25 tokens/s for those, then 40-42, as with pages faulted in huge at load).

Every call here is a hint: on other systems, or when the kernel refuses, nothing happens and nothing fails.
"""

from __future__ import annotations

import atexit
import ctypes
import sys
import threading
import weakref

MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux 5.14+
MADV_COLLAPSE = 25  # Linux 6.1+
HUGE_PAGE = 2 << 20
# Collapsed per call: the thread checks between calls that the weights' owner is still alive.
CHUNK = 16 * HUGE_PAGE

# Set when the interpreter exits: a collapsing thread then returns after its current call and is joined, so that
# none is left inside a system call while Python finalizes. A daemon thread left there aborted the process
# ("terminate called without an active exception", exit status 134) in 3 of 6 runs of `lantern tokenize`, which
# exits right after its load.
_EXITING = threading.Event()
_RUNNING: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


@atexit.register
def _finish_at_exit() -> None:
    _EXITING.set()
    for thread in list(_RUNNING):
        thread.join()


def _madvise(address: int, length: int, advice: int) -> int:
    """madvise(2) through ctypes, which releases the GIL for the call; -1 where there is no libc to ask."""
    if not sys.platform.startswith("linux") or length <= 0:
        return -1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), advice)
    except (OSError, AttributeError):
        return -1


def fault_in(address: int, length: int) -> None:
    """Have the kernel fault the range in now, in one system call (other Python threads run meanwhile): the
    loader's copies then find their pages there instead of faulting page by page."""
    _madvise(address, length, MADV_POPULATE_WRITE)


def promote_later(owner: object, address: int, length: int) -> threading.Thread | None:
    """Start a daemon thread that collapses [address, address + length) into 2 MiB pages, a chunk at a time.
    It stops as soon as `owner` (whatever keeps the memory alive, e.g. the model) is gone, and holds it only
    during one chunk; at the interpreter's exit it is stopped and joined (_finish_at_exit). Returns the thread
    (for tests to join), or None where huge pages cannot be asked for."""
    if not sys.platform.startswith("linux") or length < HUGE_PAGE:
        return None
    start = (address + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE  # only whole huge pages inside the range
    end = (address + length) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return None
    thread = threading.Thread(target=_collapse, args=(weakref.ref(owner), start, end), daemon=True,
                              name="lantern-huge-pages")
    _RUNNING.add(thread)
    thread.start()
    return thread


def _collapse(owner: weakref.ref, start: int, end: int) -> None:
    for address in range(start, end, CHUNK):
        alive = owner()
        if alive is None or _EXITING.is_set():  # the memory may be freed, or Python be exiting: stop
            return
        length = min(CHUNK, end - address)
        _madvise(address, length, MADV_HUGEPAGE)  # also lets khugepaged keep them huge later
        _madvise(address, length, MADV_COLLAPSE)
        del alive
