"""A `lantern serve` subprocess on a free loopback port, for the on-demand server tools in bench/
(flood, soak, schemathesis_run, lm_eval_check). Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
DEFAULT_MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m lanternlm serve ...` with an API key, its stderr in a log file; a context manager that
    waits for /health and, on exit, sends SIGTERM and records the exit code."""

    def __init__(self, model: str = DEFAULT_MODEL, *, name: str = "m", extra: list[str] = (), threads: int | None = None,
                 log_path: Path | None = None, api_key: str | None = None, ready_timeout: float = 300):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.api_key = api_key or "bench-" + secrets.token_hex(8)
        self.headers = {"Authorization": f"Bearer {self.api_key}"}
        self.cmd = [sys.executable, "-m", "lanternlm", "serve", "-m", str(model), "--host", "127.0.0.1",
                    "--port", str(self.port), "--served-model-name", name, "--api-key", self.api_key, *extra]
        self.env = dict(os.environ)
        if threads is not None:  # torch's (and so the kernels' pool's) thread count
            self.env["OMP_NUM_THREADS"] = str(threads)
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None
        self.load_s: float | None = None

    def __enter__(self) -> "Server":
        import httpx

        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        start = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=REPO_DIR)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"lantern serve exited with {self.proc.returncode} before it was ready"
                                 + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    self.load_s = time.perf_counter() - start
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"lantern serve was not ready within {self.ready_timeout:g} s")

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            self.exit_code = None if self.proc is None else self.proc.returncode
            return self.exit_code
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.exit_code = "killed after SIGTERM timeout"
        return self.exit_code

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> float | None:
        """Resident memory of the server process (VmRSS), MiB."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        return int(m.group(1)) / 1024 if m else None

    def metrics(self, client=None) -> dict[str, float]:
        """/metrics as {name{labels}: value} (the key is sent: /metrics is behind it)."""
        import httpx

        r = (client or httpx).get(self.base + "/metrics", headers=self.headers, timeout=10)
        r.raise_for_status()
        return parse_prometheus(r.text)


def parse_prometheus(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def default_gguf() -> Path:
    from lanternlm import store

    return Path(store.resolve(DEFAULT_MODEL))


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version(),
            "commit": commit, "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def log_path(tool: str, stamp: str) -> Path:
    """Where a tool's server log goes: a temp directory (bench/results/ ignores only *.json and *.png)."""
    import tempfile

    d = Path(tempfile.gettempdir()) / "lantern-bench-logs"
    d.mkdir(exist_ok=True)
    return d / f"{tool}-{stamp}.server.log"


def write_result(tool: str, data: dict, stamp: str | None = None) -> Path:
    RESULTS.mkdir(exist_ok=True)
    stamp = stamp or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{tool}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path
