"""vLLM's Rust router (`vllm-router` on PyPI) as a peer in the gateway benchmark: installed
into a virtualenv of its own (under `~/.cache/turnout-bench/`, reused across runs, never
in turnout's environment), started in front of the benchmark's upstream.

The router waits until each worker answers `GET /health` with 200 before it listens
(the benchmark's fake upstream answers it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROUTER_REQUIREMENT = "vllm-router>=0.1.17,<0.2"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "turnout-bench"


def router_python(venv: Path | None = None) -> Path:
    """The Python of a virtualenv that has vllm-router, made and filled if need be."""
    venv = venv or cache_dir() / "vllm-router"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making a virtualenv for vllm-router at {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(python), "-c", "import vllm_router"], capture_output=True)
    if probe.returncode != 0:
        print(f"installing {ROUTER_REQUIREMENT} into {venv}", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", ROUTER_REQUIREMENT],
                       check=True)
    return python


def router_version(python: Path) -> str:
    result = subprocess.run(
        [str(python), "-c", "from importlib.metadata import version; "
                            "print(version('vllm-router'))"],
        capture_output=True, text=True, check=True)
    return result.stdout.strip()


def start_router(python: Path, port: int, worker_urls: list[str],
                 log_path: Path) -> subprocess.Popen[bytes]:
    """The router process (it renames itself `vllm::router`; its pid is the one to
    measure), round robin over `worker_urls`."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [str(python), "-m", "vllm_router.launch_router", "--host", "127.0.0.1",
             "--port", str(port), "--worker-urls", *worker_urls, "--policy", "round_robin",
             "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
