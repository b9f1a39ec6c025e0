"""A `lantern serve` subprocess on a free port, for the server tests."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import openai

MSG = [{"role": "user", "content": "Hello world! The quick brown fox"}]
KEY = "test-key"
OTHER_KEY = "another-tenant-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, *extra: str, name: str = "tiny"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The server's output goes to a file: a pipe nobody reads would block the server once it fills.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lanternlm", "serve", "-m", model, "--port", str(self.port),
             "--served-model-name", name, *extra],
            stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=60)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def output(self) -> str:
        """Everything the server printed so far."""
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return -9
        return self.proc.returncode


def tiny_chat_folder(path, context: int = 256):
    """A tiny random Qwen2 chat model with a small byte-level tokenizer, saved as an HF folder at `path`."""
    from test_hf_folder import tiny_tokenizer
    from tiny_models import make_hf_model
    tok = tiny_tokenizer()
    make_hf_model("qwen2", vocab_size=len(tok), max_position_embeddings=context).save_pretrained(path)
    tok.save_pretrained(path)
    return path
