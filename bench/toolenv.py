"""Separate virtual environments for tools the bench drives from outside (schemathesis, lm-eval), created on
first use under bench/.venv-NAME, like bench/env.py does for the bench's own peers: their dependencies never
enter the project's environment or its test extras. Each venv holds a `.gitignore` of `*`, so git ignores it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def ensure(name: str, requirements: list[str]) -> Path:
    """bench/.venv-NAME with `requirements` installed (again whenever the list changes); returns its bin dir."""
    venv = BENCH_DIR / f".venv-{name}"
    stamp = venv / ".bench-ready"
    plan = "\n".join(requirements) + "\n"
    if stamp.is_file() and stamp.read_text() == plan:
        return venv / "bin"
    if not (venv / "bin" / "python").exists():
        print(f"creating {venv} for {name} (first use; later runs reuse it)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        (venv / ".gitignore").write_text("*\n")
    log = venv / "install.log"
    print(f"installing {' '.join(requirements)} into {venv} (log: {log})", file=sys.stderr, flush=True)
    with open(log, "a") as out:
        for args in (["install", "--upgrade", "pip"], ["install", *requirements]):
            done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", *args], stdout=out,
                                  stderr=subprocess.STDOUT)
            if done.returncode != 0:
                raise SystemExit(f"'pip {' '.join(args)}' failed in {venv} (exit {done.returncode}); see {log}")
    stamp.write_text(plan)
    return venv / "bin"
