"""The cores a new CPU engine gets (turnout.cpu_cores): examples, then properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnout.cpu_cores import (
    CorePick,
    EngineCores,
    cores_per_engine,
    format_cpu_list,
    omp_threads_bind,
    parse_cpu_list,
    pick_cores,
    worker_ranks,
)


def busy(*cores: int) -> EngineCores:
    return EngineCores(frozenset(cores), busy=True)


def cached(*cores: int) -> EngineCores:
    return EngineCores(frozenset(cores), busy=False)


def test_an_engine_gets_half_the_host_by_default() -> None:
    assert cores_per_engine(2) == 1
    assert cores_per_engine(16) == 8
    assert cores_per_engine(1) == 1  # never none
    assert cores_per_engine(16, configured=4) == 4
    assert cores_per_engine(2, configured=8) == 2  # never more than the host has


def test_the_first_engine_takes_the_first_cores() -> None:
    assert pick_cores([0, 1], [], want=1) == CorePick(frozenset({0}))
    assert pick_cores(range(8), [], want=4) == CorePick(frozenset({0, 1, 2, 3}))


def test_a_load_beside_a_serving_engine_gets_the_other_cores() -> None:
    """The case measured on 2 cores: v2 loads while v1 serves a client without pause."""
    assert pick_cores([0, 1], [busy(0)], want=1) == CorePick(frozenset({1}))
    assert pick_cores(range(8), [busy(0, 1, 2, 3)], want=4).cores == {4, 5, 6, 7}


def test_a_starting_or_serving_engine_is_avoided_before_a_cached_one() -> None:
    # Core 0 serves, core 1 holds a standby: the new engine shares with the standby.
    pick = pick_cores([0, 1], [busy(0), cached(1)], want=1)
    assert pick == CorePick(frozenset({1}))
    # Free cores come before cached ones, the least used cached ones first.
    pick = pick_cores(range(4), [cached(0), cached(0), cached(1), busy(2)], want=2)
    assert pick.cores == {3, 1} and not pick.shared


def test_too_few_cores_shares_the_least_busy_and_says_so() -> None:
    """A canary and a shadow on a 2-core host: the third busy engine shares a core."""
    pick = pick_cores([0, 1], [busy(0), busy(1), busy(1)], want=1)
    assert pick == CorePick(frozenset({0}), shared=frozenset({0}))
    # Only the cores actually shared with a busy engine are named.
    pick = pick_cores(range(4), [busy(0, 1, 2)], want=2)
    assert pick.cores == {3, 0} and pick.shared == {0}


def test_cores_outside_the_host_are_ignored() -> None:
    """An engine started before the worker's own affinity was narrowed."""
    assert pick_cores([2, 3], [busy(0, 1, 2)], want=1).cores == {3}
    with pytest.raises(ValueError):
        pick_cores([], [], want=1)


@given(host=st.sets(st.integers(0, 63), min_size=1, max_size=16),
       engines=st.lists(st.tuples(st.sets(st.integers(0, 63), min_size=1, max_size=8),
                                  st.booleans()), max_size=8),
       want=st.integers(1, 20))
def test_properties(host: set[int], engines: list[tuple[set[int], bool]], want: int) -> None:
    views = [EngineCores(frozenset(cores), flag) for cores, flag in engines]
    pick = pick_cores(host, views, want=want)
    busy_cores = {core for v in views if v.busy for core in v.cores}
    free = host - busy_cores
    # Exactly the wanted number of the host's cores (capped to the host).
    assert pick.cores <= host and len(pick.cores) == min(want, len(host))
    # Never a busy engine's core while a free one is left unchosen.
    if pick.cores & busy_cores:
        assert free <= pick.cores
    else:
        assert not pick.shared
    assert pick.shared == pick.cores & busy_cores


def test_omp_binding_stays_inside_the_engines_cores() -> None:
    assert omp_threads_bind({1}) == "1"
    assert omp_threads_bind({4, 5, 6, 7}) == "4-7"
    assert omp_threads_bind({0, 1, 2, 3}, ranks=2) == "0-1|2-3"
    assert omp_threads_bind({0, 1, 2}, ranks=2) == "0|1-2"  # the remainder to the last
    assert omp_threads_bind({3}, ranks=2) == "nobind"  # threads inherit the engine's mask


def test_worker_ranks_from_engine_args() -> None:
    assert worker_ranks({}) == 1
    assert worker_ranks({"tensor_parallel_size": 2}) == 2
    assert worker_ranks({"--tensor-parallel-size": "2", "pipeline_parallel_size": 2}) == 4
    assert worker_ranks({"tp": 4}) == 4
    assert worker_ranks({"tensor_parallel_size": "many"}) == 1  # vLLM refuses it itself


@pytest.mark.parametrize("cores, text", [
    ({0}, "0"), ({0, 1}, "0-1"), ({0, 1, 2, 5, 7, 8}, "0-2,5,7-8"), (set(), "")])
def test_cpu_lists_round_trip(cores: set[int], text: str) -> None:
    assert format_cpu_list(cores) == text
    assert parse_cpu_list(text) == cores


def test_cpu_list_as_the_kernel_writes_it() -> None:
    assert parse_cpu_list("0-1\n") == {0, 1}
    with pytest.raises(ValueError):
        parse_cpu_list("3-1")
    with pytest.raises(ValueError):
        parse_cpu_list("x")
