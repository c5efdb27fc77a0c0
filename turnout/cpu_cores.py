"""Which CPU cores a new engine gets on a CPU host: a partition, not a free-for-all.

Pure code: the engine worker reads the cores of its host (its own CPU affinity) and the
cores each running engine's processes are allowed on (`/proc/<pid>/status`), decides here,
and starts the new engine with its CPU affinity set to the answer, so that vLLM's API
server, engine core and worker threads all run there (see `activities/engines.py`).

Why: vLLM's CPU backend binds only its worker's OpenMP threads; its API server and engine
core run wherever the kernel lets them. Measured on a 2-core host: a new engine started
beside an engine that serves a client without pause was not ready after 5 minutes when
its processes could run on every core (3 runs), and ready in 45-100 s when each engine's
processes were confined to a core of their own (and in 70-100 s when both engines were
confined to the same core: sharing is slower, it does not hang).

The rules:

* an engine gets `want` cores (`engine_cpu_cores`; by default half the host's cores, so
  the two engines of a switch — the stable version and its target — never share);
* cores no busy engine uses come first: an engine is busy when it serves traffic, is a
  rollout's candidate or a shadow, or is still starting; cached engines (standby,
  preloaded, idle) serve nothing and may share;
* among those, the cores fewest cached engines use, then the lowest numbers;
* where the host has too few such cores, the new engine shares the least busy ones (and
  says so): refusing would make a canary with a shadow impossible on a small host, and a
  shared core was measured to finish the load. A load that still makes no progress is
  failed by the stall detection (`engine_stall_timeout_s`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineCores:
    """The cores a running engine's processes may use, and whether it is busy."""

    cores: frozenset[int]
    busy: bool


@dataclass(frozen=True)
class CorePick:
    """The cores chosen for a new engine; `shared` names the cores a busy engine uses too."""

    cores: frozenset[int]
    shared: frozenset[int] = frozenset()


def cores_per_engine(host_cores: int, configured: int = 0) -> int:
    """How many cores an engine gets: `configured` (0: half the host's, at least one),
    never more than the host has."""
    want = configured if configured > 0 else host_cores // 2
    return max(1, min(want, host_cores))


def pick_cores(host_cores: Iterable[int], engines: Iterable[EngineCores], *,
               want: int) -> CorePick:
    """The cores of a new engine on a host with `host_cores`, beside `engines`.

    Cores of existing engines outside `host_cores` are ignored (an engine started before
    the worker's own affinity was narrowed). `want` is capped to the host's cores.
    """
    host = sorted(set(host_cores))
    if not host:
        raise ValueError("a host has at least one core")
    want = max(1, min(want, len(host)))
    busy: Counter[int] = Counter()
    cached: Counter[int] = Counter()
    for engine in engines:
        for core in engine.cores:
            (busy if engine.busy else cached)[core] += 1
    ranked = sorted(host, key=lambda core: (busy[core], cached[core], core))
    chosen = frozenset(ranked[:want])
    return CorePick(chosen, frozenset(core for core in chosen if busy[core]))


def omp_threads_bind(cores: Iterable[int], ranks: int = 1) -> str:
    """vLLM's `VLLM_CPU_OMP_THREADS_BIND` for an engine confined to `cores`.

    One list per worker rank (tensor × pipeline parallel), each a contiguous share of the
    cores, so every OpenMP thread is bound inside the engine's own cores. With fewer cores
    than ranks, `nobind`: the threads then stay on the engine's cores by inheritance.
    """
    ordered = sorted(set(cores))
    ranks = max(1, ranks)
    if len(ordered) < ranks:
        return "nobind"
    size = len(ordered) // ranks
    groups = [ordered[i * size:(i + 1) * size] for i in range(ranks)]
    groups[-1].extend(ordered[ranks * size:])  # the remainder goes to the last rank
    return "|".join(format_cpu_list(group) for group in groups)


def worker_ranks(engine_args: Mapping[str, Any]) -> int:
    """The worker processes per engine a version's `engine_args` ask for (tp × pp)."""
    sizes = {"tensor-parallel-size": 1, "pipeline-parallel-size": 1}
    aliases = {"tp": "tensor-parallel-size", "pp": "pipeline-parallel-size"}
    for key, value in engine_args.items():
        name = key.strip("-").replace("_", "-")
        name = aliases.get(name, name)
        if name in sizes:
            try:
                sizes[name] = max(1, int(value))
            except (TypeError, ValueError):
                pass  # vLLM refuses the value itself, with its own message
    return sizes["tensor-parallel-size"] * sizes["pipeline-parallel-size"]


def format_cpu_list(cores: Iterable[int]) -> str:
    """`{0, 1, 2, 5}` → `0-2,5`: the kernel's list format (`Cpus_allowed_list`)."""
    ordered = sorted(set(cores))
    parts: list[str] = []
    start = prev = None
    for core in ordered:
        if prev is not None and core == prev + 1:
            prev = core
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = core
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)


def parse_cpu_list(text: str) -> frozenset[int]:
    """`0-2,5` → `{0, 1, 2, 5}`; raises ValueError on anything else."""
    cores: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cores.update(range(first, last + 1))
    return frozenset(cores)
