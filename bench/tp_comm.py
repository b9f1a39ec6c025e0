"""What one collective costs between tensor-parallel ranks on this host, by torch.distributed backend and
transport: the floor under a sharded decode step, which needs two all-reduces of the hidden state per layer
and a gather of the logits.

    bench/.venv/bin/python -m bench.tp_comm                  # 2 ranks, gloo over TCP and over libuv
    bench/.venv/bin/python -m bench.tp_comm --ranks 2 --repeats 400
    bench/.venv/bin/python -m bench.tp_comm --compute-us 200 --pin all   # as inside a decode step, pinned whole

Each rank is a process (torch.multiprocessing, spawn) with one thread, its main thread pinned to its own core
after the process group exists (gloo's threads stay free, as `lantern serve --tensor-parallel N` places them;
`--pin all` pins the whole process before, `--pin none` not at all). For each message size it times, on rank 0,
the median of `--repeats` calls of all_reduce (sum), broadcast, all_gather and a gather into one tensor plus the
sum (what the sharded model's row-parallel layers do), after a warm-up. `--compute-us N` puts about N
microseconds of matrix-vector work before each call (2N on rank 0, as its larger share of heads), as a decode
step does between its collectives: that is where the schedule of gloo's threads shows. The sizes: one token's hidden
state for SmolLM2-135M (576 floats), a 0.5B (896) and a 7B model (4096), a batch of 8 tokens (8 x 576), and one
step's batch message of the driver (a few hundred int64). NCCL needs GPUs and MPI a torch built with it; both are
reported as unavailable here when they are.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = {"576 f32 (135M token)": (576, torch.float32), "896 f32 (0.5B token)": (896, torch.float32),
         "4096 f32 (7B token)": (4096, torch.float32), "8 x 576 f32 (8 tokens)": (8 * 576, torch.float32),
         "256 i64 (a step's batch)": (256, torch.int64)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, port: int, backend: str, libuv: bool, transport: str | None, repeats: int,
              out_path: str, pin: str, compute_us: int) -> None:
    if transport:  # read by torch's gloo when it creates its device
        os.environ["GLOO_DEVICE_TRANSPORT"] = transport
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pinnable = len(cores) >= world
    if pin == "all" and pinnable:
        os.sched_setaffinity(0, {cores[rank]})
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60),
                          use_libuv=libuv)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    if pin == "after-init" and pinnable:  # this thread only: gloo's threads keep every core
        os.sched_setaffinity(0, {cores[rank]})
    a, v = torch.randn(576, 576), torch.randn(576)
    start = time.perf_counter()
    for _ in range(100):
        a @ v
    per_product = (time.perf_counter() - start) / 100
    products = round(compute_us * 1e-6 / per_product) * (2 if rank == 0 else 1)
    results = {}
    for label, (n, dtype) in SIZES.items():
        x = torch.ones(n, dtype=dtype)
        gathered = [torch.empty_like(x) for _ in range(world)]
        flat = torch.empty(world * n, dtype=dtype)
        ops = {"all_reduce": lambda: dist.all_reduce(x), "broadcast": lambda: dist.broadcast(x, 0),
               "all_gather": lambda: dist.all_gather(gathered, x),
               # the same sum as all_reduce, from every rank's part: one gather round instead of a ring
               "all_gather_single + sum": lambda: (dist.all_gather_single(flat, x),
                                                        flat.view(world, n).sum(0))}
        for name, op in ops.items():
            for _ in range(max(10, repeats // 10)):
                op()
            times = []
            for _ in range(repeats):
                for _ in range(products):
                    a @ v
                start = time.perf_counter()
                op()
                times.append(time.perf_counter() - start)
            results[f"{name} {label}"] = statistics.median(times) * 1e6
    dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def measure(world: int, backend: str, libuv: bool, transport: str | None, repeats: int, pin: str,
            compute_us: int) -> dict[str, float] | str:
    if backend == "nccl" and not torch.cuda.is_available():
        return "unavailable (no CUDA device)"
    if backend == "mpi" and not dist.is_mpi_available():
        return "unavailable (this torch is built without MPI)"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        try:
            mp.start_processes(rank_main, args=(world, free_port(), backend, libuv, transport, repeats, out, pin,
                                                compute_us),
                               nprocs=world, start_method="spawn", join=True)
        except Exception as e:  # a transport this build lacks
            return f"failed: {str(e).strip().splitlines()[-1][:120]}"
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--pin", choices=("after-init", "all", "none"), default="after-init")
    p.add_argument("--compute-us", type=int, default=0)
    args = p.parse_args(argv)
    runs = {"gloo, TCP": ("gloo", False, None), "gloo, TCP, libuv store": ("gloo", True, None),
            "gloo, UV transport": ("gloo", True, "UV"), "mpi": ("mpi", False, None), "nccl": ("nccl", False, None)}
    table = {name: measure(args.ranks, backend, libuv, transport, args.repeats, args.pin, args.compute_us)
             for name, (backend, libuv, transport) in runs.items()}
    print(f"median microseconds per call on rank 0, {args.ranks} ranks on one host, one thread each, pinned: "
          f"{args.pin}, ~{args.compute_us} us of compute before each call (x2 on rank 0)")
    measured = {k: v for k, v in table.items() if isinstance(v, dict)}
    for name, value in table.items():
        if isinstance(value, str):
            print(f"  {name}: {value}")
    ops = list(next(iter(measured.values())))
    width = max(len(op) for op in ops)
    print(f"  {'':<{width}}  " + "  ".join(f"{name:>24}" for name in measured))
    for op in ops:
        print(f"  {op:<{width}}  " + "  ".join(f"{measured[name][op]:>24.1f}" for name in measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
