"""What the benchmarks share: a throw-away local stack on free ports."""

from __future__ import annotations

import compileall
import os
import tempfile
from pathlib import Path
from typing import Any

from tests.support import free_port
from turnout.config import ModelSwitchingConfig
from workers.stack import Stack


def bench_stack(name: str, **overrides: Any) -> Stack:
    """A headless stack in a fresh temporary directory, on free ports (runs beside
    `make run`); `overrides` are settings. Start it with `await stack.start()`.

    The project's packages are byte-compiled first, as an installed package is: Temporal's
    sandbox imports the workflow modules afresh for every workflow it starts, and under
    PYTHONDONTWRITEBYTECODE (set on these machines) each import would compile the source.
    """
    root_dir = Path(__file__).resolve().parents[1]
    for package in ("turnout", "workflows", "activities"):
        compileall.compile_dir(root_dir / package, quiet=1)
    root = Path(tempfile.mkdtemp(prefix=f"turnout-bench-{name}-"))
    settings = ModelSwitchingConfig.from_env(
        {}, **{"state_dir": str(root), "database_url": f"sqlite+aiosqlite:///{root}/turnout.db",
               "temporal_address": f"127.0.0.1:{free_port()}", "api_port": free_port(),
               "gateway_port": free_port(), "gateway_admin_port": free_port(),
               "engine_host": f"bench-{name}",
               # Engines away from `make run`'s 8100-8199: a bench beside it once took the
               # port a `make run` engine bound first, and its warm-up reached that engine.
               "engine_port_start": 26100, "engine_port_end": 26199,
               # the benchmarks' fake engines are endpoints on 127.0.0.1
               "allow_private_endpoints": True, **overrides})
    print(f"stack state and logs: {root}", flush=True)
    return Stack(settings=settings, temporal_db=root / "temporal.db", log_dir=root / "logs",
                 temporal_ui_port=free_port(), headless=True)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and of its children (a gateway's workers under their
    supervisor), so far."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total
