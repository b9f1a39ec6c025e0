"""Starting the ranks of a tensor-parallel run and forming their process groups.

One host: `start` spawns ranks 1..N-1 itself (torch.multiprocessing, spawn), the calling process being rank 0;
they meet over 127.0.0.1 through a store on a free port. Several hosts: `torchrun` starts every rank, and
`start` joins the group its environment describes (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT). Either way each rank gets its share of its host's cores (threads and CPU affinity) before it
loads anything, and gloo (NCCL on CUDA) groups over the same ranks:

- the default group, with `STARTUP_TIMEOUT`: ranks that cannot find each other are an error, not a wait;
- `control`, rank 0's step messages (driver.py): without a time limit on the workers, which wait there for as
  long as the server is idle; rank 0 bounds each send itself by `STEP_TIMEOUT` (a gloo send waits for the
  receiver to post its receive, so a hung worker shows there);
- `group`, the model's own collectives (all-reduce, all-gather) with `STEP_TIMEOUT`;
- under torchrun, `liveness` (gloo): each worker's goodbye to rank 0 (`Ranks.watch`).

A rank that exits closes its sockets, and every collective waiting on it fails at once. Rank 0 also notices a
death while idle (`Ranks.watch`): on one host from its workers' process sentinels, under torchrun from a receive
on `liveness` that the worker's closed connection breaks. This module knows no model: a worker's work is the
picklable callable `start` is given.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import wait as wait_for

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import LanternError

STARTUP_TIMEOUT = timedelta(seconds=60)  # for all ranks to meet
STEP_TIMEOUT = timedelta(seconds=60)     # for one collective of a step: a rank silent for longer has hung
IDLE = timedelta(days=365)               # a worker waits this long for rank 0's next step: an idle server is fine
STOP_TIMEOUT = 10.0                      # seconds workers get to leave after "stop" before they are killed
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class TensorParallelError(LanternError):
    """The ranks could not start, or one of them failed."""


class Workers:
    """The processes rank 0 of a one-host run started (rank r at [r - 1]), each with the read end of a pipe on
    which it sends its failure as one line."""

    def __init__(self, processes: list, reports: list):
        self.processes, self.reports = processes, reports
        self._messages: dict[int, str | None] = {}  # rank -> what it sent (read once)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    @property
    def sentinels(self) -> list:
        return [p.sentinel for p in self.processes]

    def cause(self, wait: float = 0.0) -> str | None:
        """Why a worker is gone (its own line, else its exit status or signal), or None while all live, waiting
        up to `wait` seconds for one to go (a collective can fail a moment before its peer is reaped)."""
        gone = set(wait_for(self.sentinels, timeout=wait))
        for rank, (proc, report) in enumerate(zip(self.processes, self.reports), start=1):
            if proc.sentinel in gone:
                proc.join(1.0)  # its sentinel closes as it exits, a moment before it can be reaped
            if proc.exitcode is None:
                continue
            if rank not in self._messages:
                try:
                    self._messages[rank] = report.recv() if report.poll() else None
                except (EOFError, OSError):
                    self._messages[rank] = None
            if self._messages[rank]:
                return f"tensor-parallel rank {rank} failed: {self._messages[rank]}"
            how = f"signal {-proc.exitcode}" if proc.exitcode < 0 else f"exit status {proc.exitcode}"
            return f"tensor-parallel rank {rank} exited ({how})"
        return None

    def stop(self, grace: float) -> None:
        """Wait up to `grace` seconds for each to exit, then kill what is left."""
        for proc in self.processes:
            proc.join(grace)
            if proc.is_alive():
                proc.kill()
                proc.join()


@dataclass
class Ranks:
    """This process's place in a tensor-parallel group, and (on rank 0 of a one-host run) the workers it started."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    backend: str                                   # "gloo" or "nccl"
    group: object                                  # the model's collectives (dist.ProcessGroup)
    control: object                                # rank 0's step messages
    launcher: str                                  # "spawn" (started by Lantern) or "torchrun"
    liveness: object = None                        # torchrun: each worker's goodbye to rank 0 (see watch)
    workers: Workers | None = None                 # rank 0 of a spawn run: the processes it started
    failed: str | None = None                      # why the group failed (the first reason), once it has
    _on_failure: Callable[[str], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _restore: tuple[list[int], int] | None = None  # rank 0 of a spawn run: its cores and threads before
    _closing: bool = False
    _wake: tuple[int, int] | None = None           # a pipe that ends the watcher at close

    @property
    def pids(self) -> list[int]:
        """The worker processes this rank started (empty under torchrun and on workers)."""
        return self.workers.pids if self.workers else []

    def fail(self, reason: str) -> str:
        """Record that the group failed (the first reason stays) and, once, tell whoever `watch`es, on a thread
        of its own (the handler may wait). Returns the reason that stays."""
        with self._lock:
            first = self.failed is None
            if first:
                self.failed = reason
        if first and self._on_failure is not None:
            threading.Thread(target=self._on_failure, args=(reason,), name="lantern-tp-failed", daemon=True).start()
        return self.failed

    def cause(self, wait: float = 0.0) -> str | None:
        """Which worker this rank started is gone and how, or None (see Workers.cause)."""
        return self.workers.cause(wait) if self.workers else None

    def watch(self, on_failure: Callable[[str], None]) -> None:
        """Have `on_failure(reason)` called (once, on a thread of its own) when the group fails: a worker exits
        (seen at once, also while idle), or a step fails (driver.py). Workers this process spawned are watched
        through their process sentinels; torchrun's, on other hosts maybe, through a receive from each that only
        its goodbye (`close`) completes, and that fails as soon as its connection closes."""
        self._on_failure = on_failure
        if self.launcher == "torchrun" and self.rank == 0:
            for rank in range(1, self.world):
                threading.Thread(target=self._await_goodbye, args=(rank,), name=f"lantern-tp-watch{rank}",
                                 daemon=True).start()
        if self.workers is None:
            return
        self._wake = os.pipe()

        def watcher():
            wait_for(self.workers.sentinels + [self._wake[0]])
            if not self._closing:
                self.fail(self.cause(wait=1.0) or "a tensor-parallel rank exited")

        threading.Thread(target=watcher, name="lantern-tp-watch", daemon=True).start()

    def _await_goodbye(self, rank: int) -> None:
        try:
            dist.recv(torch.zeros(1), src=rank, group=self.liveness)
            reason = f"tensor-parallel rank {rank} left"
        except RuntimeError:
            reason = f"tensor-parallel rank {rank} went away (its connection closed)"
        if not self._closing:
            self.fail(reason)

    def close(self, grace: float = STOP_TIMEOUT) -> None:
        """After the workers were told to stop (driver.py): wait up to `grace` seconds for those this rank
        started (none when the group failed), kill what is left, and leave the process groups."""
        self._closing = True
        if self._wake is not None:
            os.write(self._wake[1], b"x")
        if self.launcher == "torchrun" and self.rank != 0:  # to rank 0's watcher: this rank leaves on purpose
            try:
                dist.isend(torch.zeros(1), 0, group=self.liveness).wait(timeout=timedelta(seconds=5))
            except RuntimeError:  # rank 0 is gone already
                pass
        if self.workers is not None:
            self.workers.stop(0 if self.failed else grace)
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._restore is not None:  # the calling process has its cores back (the API may go on without ranks)
            _place(*self._restore)


def torchrun_rank() -> int | None:
    """This process's global rank when torchrun started it, else None."""
    if not all(name in os.environ for name in TORCHRUN_VARS):
        return None
    return int(os.environ["RANK"])


def start(world: int, device: torch.device, threads: int | None, worker: Callable[[Ranks], None]) -> Ranks:
    """Form a group of `world` ranks and return this process's place in it. Under torchrun this process is the
    rank its environment says (the caller runs `worker` itself when that is not 0); otherwise it is rank 0 and
    `world - 1` spawned processes run `worker(ranks)` (a picklable callable: it loads the rank's shard and serves
    rank 0's forwards). `threads`: per rank (default: the host's cores split between the ranks on it)."""
    if world < 1:
        raise TensorParallelError(f"tensor parallelism needs at least 1 rank, got {world}")
    rank = torchrun_rank()
    if rank is not None:
        return _join_torchrun(world, device, threads)
    backend = "nccl" if device.type == "cuda" else "gloo"
    cores = _cores()
    before = (cores, torch.get_num_threads())
    try:  # port 0: the system picks a free one, so two servers never race for it
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=STARTUP_TIMEOUT,
                              wait_for_workers=False)
    except (RuntimeError, OSError) as e:
        raise TensorParallelError(f"cannot open the tensor-parallel rendezvous on 127.0.0.1: "
                                  f"{_first_line(e)}") from None
    ctx = mp.get_context("spawn")
    workers = Workers([], [])
    try:
        for r in range(1, world):
            read, write = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_spawned, name=f"lantern-tp-rank{r}", daemon=True,
                               args=(r, world, store.port, str(_rank_device(device, r)),
                                     _share(cores, r, world), threads, worker, write))
            proc.start()
            write.close()
            workers.processes.append(proc)
            workers.reports.append(read)
        _use(_rank_device(device, 0))
        _await(store, workers)
        control, group = _groups(backend, store, 0, world)
        # after the spawns (children would inherit a narrowed affinity) and after the groups (see _place)
        _place(_share(cores, 0, world), threads)
    except BaseException as e:
        reason = workers.cause(wait=1.0)
        workers.stop(0)
        _place(*before)
        if isinstance(e, LanternError):
            raise
        raise TensorParallelError(reason or f"the tensor-parallel ranks did not meet within "
                                  f"{STARTUP_TIMEOUT.seconds} s: {_first_line(e)}") from None
    return Ranks(0, world, 0, world, _rank_device(device, 0), backend, group, control, "spawn", workers=workers,
                 _restore=before)


def _join_torchrun(world: int, device: torch.device, threads: int | None) -> Ranks:
    env = os.environ
    size, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
    if size != world:
        raise TensorParallelError(f"torchrun started {size} ranks (WORLD_SIZE) but --tensor-parallel is {world}: "
                                  "give torchrun --nnodes x --nproc-per-node = N")
    local_rank = int(env["LOCAL_RANK"])
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(threads or len(_share(_cores(), local_rank, local_world)))
    _use(_rank_device(device, local_rank))
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=STARTUP_TIMEOUT)
        control = dist.new_group(backend=backend, timeout=IDLE)
        group = dist.new_group(backend=backend, timeout=STEP_TIMEOUT)
        liveness = dist.new_group(backend="gloo", timeout=IDLE)  # CPU tensors whatever the device
    except (RuntimeError, OSError, ValueError) as e:
        raise TensorParallelError(f"rank {rank} could not join the tensor-parallel group at "
                                  f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}: {_first_line(e)}") from None
    _place(_share(_cores(), local_rank, local_world), threads)  # after the groups (see _place)
    return Ranks(rank, world, local_rank, local_world, _rank_device(device, local_rank), backend, group, control,
                 "torchrun", liveness)


def _await(store, workers: Workers) -> None:
    """Until every spawned rank has reached the store (each sets its key), failing at once when one exits first
    (it could not start: its error comes through its report pipe) or after STARTUP_TIMEOUT."""
    keys = [f"lantern/started/{rank}" for rank in range(1, len(workers.processes) + 1)]
    deadline = time.monotonic() + STARTUP_TIMEOUT.total_seconds()
    while not store.check(keys):
        if not all(p.is_alive() for p in workers.processes):
            raise TensorParallelError(workers.cause(wait=1.0) or "a tensor-parallel rank exited while starting")
        if time.monotonic() > deadline:
            raise TensorParallelError(f"the tensor-parallel ranks did not start within "
                                      f"{STARTUP_TIMEOUT.seconds} s")
        wait_for(workers.sentinels, timeout=0.05)  # the poll's pause; returns at once when one exits


def _groups(backend: str, store, rank: int, world: int):
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=STARTUP_TIMEOUT)
    return dist.new_group(backend=backend, timeout=IDLE), dist.new_group(backend=backend, timeout=STEP_TIMEOUT)


def _spawned(rank: int, world: int, port: int, device: str, cores: list[int], threads: int | None,
             worker: Callable[[Ranks], None], report) -> None:
    """A worker process's body: its cores, the group, then `worker`. Its failure goes to rank 0 as one line
    (rank 0 prints it), so a start-up error is one line however many ranks there are."""
    # Rank 0 stops the workers (Ctrl-C and SIGTERM reach a terminal's or a service's whole process group): they
    # finish the step they are in, take "stop", or see rank 0's sockets close.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        torch.set_num_threads(threads or len(cores))
        _use(torch.device(device))
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=STARTUP_TIMEOUT)
        store.set(f"lantern/started/{rank}", "1")
        backend = "nccl" if device.startswith("cuda") else "gloo"
        control, group = _groups(backend, store, rank, world)
        _place(cores, threads)  # after the groups (see _place)
        worker(Ranks(rank, world, rank, world, torch.device(device), backend, group, control, "spawn"))
    except Exception as e:  # whatever stopped it, rank 0 reports it as one line
        try:
            report.send(_first_line(e))
        except OSError:  # rank 0 is gone
            pass
        os._exit(1)
    os._exit(0)  # skips the teardown of the process groups' threads, which may still wait on a peer


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _share(cores: list[int], local_rank: int, local_world: int) -> list[int]:
    """The cores local rank `local_rank` of `local_world` gets: a contiguous slice (one core, shared, when the
    host has fewer cores than ranks)."""
    if len(cores) < local_world:
        return [cores[local_rank % len(cores)]]
    per = len(cores) // local_world
    return cores[local_rank * per:(local_rank + 1) * per]


def _place(cores: list[int], threads: int | None) -> None:
    """Pin the calling thread to `cores` (threads it starts later, PyTorch's and the kernels' pool, inherit it)
    and compute on that many threads (or `threads`): before anything is loaded, as the kernels' pool follows
    torch's count, but after the process groups exist, so that gloo's own threads stay free to run on any core.
    Pinned with the rank, a gloo thread that has a message to move waits for the rank's compute to give up its
    core, a whole time slice: SmolLM2 at TP=2 on 2 cores decoded 12 tok/s with a quarter of its collectives
    taking ~4 ms, 33 tok/s with gloo's threads left free (p90 of a collective 3.7 -> 0.4 ms)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads or len(cores))


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    """CUDA ranks take one GPU each (their local rank's); CPU ranks share the CPU device."""
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def _use(device: torch.device) -> None:
    """This process's GPU, before its group forms (NCCL binds a process to the current device)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]
