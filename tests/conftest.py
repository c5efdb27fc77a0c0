"""Shared fixtures. Keep this file small: each fixture here is used by several test layers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer, start_postgres

# The stores every module marked `both_stores` runs on, each as its own parameter.
STORE_KINDS = ("sqlite", "postgresql")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_stores: run the module's store-using tests on SQLite and on a real "
                   "PostgreSQL server (the `store_kind` parameter)")


# `.ci/run` sets this: on CI every test must run, so a skip (vLLM or transformers missing,
# too few cores) fails the run instead of passing quietly.
FAIL_ON_SKIP = os.environ.get("TURNOUT_FAIL_ON_SKIP", "") not in ("", "0", "false")
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:  # a whole module skipped at import (`importorskip`)
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if FAIL_ON_SKIP and _skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FAIL_ON_SKIP and _skipped:
        terminalreporter.write_line(
            f"TURNOUT_FAIL_ON_SKIP: {len(_skipped)} skipped, which fails this run: "
            + ", ".join(_skipped[:20]), red=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests of a `both_stores` module that use a store run once per store kind, grouped by
    kind (the module's fixtures are set up once for each)."""
    if "store_kind" in metafunc.fixturenames and \
            metafunc.definition.get_closest_marker("both_stores"):
        metafunc.parametrize("store_kind", STORE_KINDS, indirect=True, scope="module")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session. It never skips: if it cannot start, every
    test that needs it errors with the reason (`PostgresUnavailable`)."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def store_kind(request: pytest.FixtureRequest) -> str:
    """"sqlite" or "postgresql": the store this module's tests run on (SQLite unless the
    module is marked `both_stores`)."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="module")
def new_database(request: pytest.FixtureRequest, store_kind: str) -> Callable[[Path], str]:
    """Make an empty database (no schema) of this module's kind: `new_database(dir)` is its
    URL (a SQLite file in `dir`, or a new database on the session's PostgreSQL)."""
    if store_kind == "sqlite":
        return lambda root: f"sqlite+aiosqlite:///{root}/turnout.db"
    if store_kind != "postgresql":
        raise ValueError(f"unknown store kind {store_kind!r}")
    server: PostgresServer = request.getfixturevalue("postgres")
    return lambda root: server.create_database()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`{"tiny-v1": dir, "tiny-v2": dir}`: two versions of a tiny Llama vLLM can serve.

    Set `TURNOUT_TEST_MODELS_DIR` to reuse models across runs (making them takes ~10 s).
    """
    from turnout.tinymodels import ensure_tiny_models

    cached = os.environ.get("TURNOUT_TEST_MODELS_DIR")
    root = Path(cached) if cached else tmp_path_factory.mktemp("models")
    return ensure_tiny_models(root)
