"""The weight arena's pages (pages.py): promoted to 2 MiB pages after the load, by a thread that lets go of the
memory's owner between chunks and stops once the owner is gone."""

from __future__ import annotations

import gc
import os
import sys
import weakref
from pathlib import Path

import pytest
import torch

from lanternlm import pages


class Owner:
    """Stands for the model: what keeps the arena's memory alive."""


def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(pages, "_madvise", lambda address, length, advice: seen.append((address, length, advice)) or 0)
    return seen


def test_the_range_is_collapsed_chunk_by_chunk_while_the_owner_lives(monkeypatch):
    seen = calls(monkeypatch)
    owner = Owner()
    start, end = 10 * pages.HUGE_PAGE, 10 * pages.HUGE_PAGE + 2 * pages.CHUNK + 3 * pages.HUGE_PAGE
    pages._collapse(weakref.ref(owner), start, end)
    collapsed = [(a, n) for a, n, advice in seen if advice == pages.MADV_COLLAPSE]
    assert collapsed == [(start, pages.CHUNK), (start + pages.CHUNK, pages.CHUNK),
                         (start + 2 * pages.CHUNK, 3 * pages.HUGE_PAGE)]
    assert [(a, n) for a, n, advice in seen if advice == pages.MADV_HUGEPAGE] == collapsed


def test_nothing_is_touched_once_the_owner_is_gone(monkeypatch):
    seen = calls(monkeypatch)
    owner = Owner()
    ref = weakref.ref(owner)
    del owner
    gc.collect()
    pages._collapse(ref, 0, 4 * pages.CHUNK)
    assert seen == []


def test_only_whole_huge_pages_inside_the_range_are_asked_for(monkeypatch):
    seen = calls(monkeypatch)
    owner = Owner()
    thread = pages.promote_later(owner, pages.HUGE_PAGE + 4096, 3 * pages.HUGE_PAGE)
    if thread is None:
        pytest.skip("huge pages are asked for on Linux only")
    thread.join(timeout=60)
    assert not thread.is_alive() and thread.daemon
    # [2 MiB + 4 KiB, 8 MiB + 4 KiB) holds the whole pages [4 MiB, 8 MiB) only
    assert {(a, n) for a, n, _ in seen} == {(2 * pages.HUGE_PAGE, 2 * pages.HUGE_PAGE)}
    assert pages.promote_later(owner, pages.HUGE_PAGE + 4096, pages.HUGE_PAGE) is None  # no whole page inside


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping that holds `address` (/proc/self/smaps), in KiB."""
    inside, total = False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1])
    return total


def test_a_filled_buffer_ends_up_in_huge_pages():
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not enabled.exists() or "[never]" in enabled.read_text():
        pytest.skip("transparent huge pages are off on this system")
    release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    if release < (6, 1):
        pytest.skip(f"MADV_COLLAPSE needs Linux 6.1, this is {os.uname().release}")
    buffer = torch.empty(9 * pages.HUGE_PAGE, dtype=torch.uint8)
    start = buffer.data_ptr() + (-buffer.data_ptr()) % pages.HUGE_PAGE
    pages.fault_in(start, 8 * pages.HUGE_PAGE)
    buffer.fill_(7)
    thread = pages.promote_later(buffer, start, 8 * pages.HUGE_PAGE)
    thread.join(timeout=60)
    assert _anon_huge_kib(start) >= 8 * 2048, "the kernel did not collapse the range (MADV_COLLAPSE: Linux 6.1+)"
    assert bool((buffer == 7).all())  # collapsing moves pages, never their contents


def test_at_exit_a_running_collapse_stops_after_its_call_and_is_joined(monkeypatch):
    # A daemon thread left inside madvise while Python finalized aborted `lantern tokenize` ("terminate called
    # without an active exception"). The exit hook lets the call in progress finish, then joins the thread.
    import threading

    monkeypatch.setattr(pages, "_EXITING", threading.Event())
    inside, release, seen = threading.Event(), threading.Event(), []

    def slow(address, length, advice):
        seen.append(advice)
        inside.set()
        release.wait(timeout=60)
        return 0

    monkeypatch.setattr(pages, "_madvise", slow)
    owner = Owner()
    thread = pages.promote_later(owner, 0, 64 * pages.CHUNK)  # 64 chunks to go
    assert inside.wait(timeout=60)  # the thread is inside its first call
    pages._EXITING.set()  # as the exit hook does first; then the call returns
    release.set()
    pages._finish_at_exit()
    assert not thread.is_alive()
    assert seen == [pages.MADV_HUGEPAGE, pages.MADV_COLLAPSE]  # the chunk it was in, and nothing after
