"""`HealthMonitor` on its own: recording, judging, the local alert lifecycle, thresholds.

The stack is absent here (its address is a port nothing listens on), which is also the
outage path: local monitoring must go on. Relaying the stack's alerts is tested against
a real control plane in tests/integration/test_guide_examples.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from tests.support import free_port
from turnout.alerting import AlertSystem
from turnout.client.health_monitor import HealthMonitor
from turnout.config import ModelSwitchingConfig
from turnout.domain import Alert, AlertSeverity, AlertState
from turnout.telemetry.health import MetricLimit, MonitorThresholds, VersionState


def monitor(interval_s: float = 60, handlers: list[Any] | None = None,
            **changes: Any) -> HealthMonitor:
    thresholds = MonitorThresholds(min_requests=10).updated(changes)
    return HealthMonitor(AlertSystem(handlers or []), thresholds=thresholds,
                         interval_s=interval_s, api_url=f"http://127.0.0.1:{free_port()}")


def record(m: HealthMonitor, key: str, n: int, *, errors: int = 0,
           latency_ms: float = 100) -> None:
    for i in range(n):
        m.record_request(key, latency_ms, error=i < errors)


def test_record_request_from_many_threads_loses_nothing() -> None:
    m = monitor()
    barrier = threading.Barrier(8)

    def work(worker: int) -> None:
        barrier.wait()
        for i in range(2000):
            m.record_request(f"model_v{worker % 2}", float(i), error=i % 10 == 0,
                             ttft_ms=5.0)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    figures = {key: m.figures(key) for key in ("model_v0", "model_v1")}
    assert [f.requests for f in figures.values()] == [8000, 8000]
    assert [f.errors for f in figures.values()] == [800, 800]
    # Within the 1% of the windows' histograms (turnout.telemetry.sketch).
    assert figures["model_v0"].ttft_p50_ms == pytest.approx(5.0, rel=0.01)
    assert figures["model_v0"].latency_p50_ms == pytest.approx(999.5, rel=0.01)


def test_memory_is_bounded_per_model_key() -> None:
    m = HealthMonitor(AlertSystem([]), interval_s=60, window_size=100,
                      api_url=f"http://127.0.0.1:{free_port()}")
    record(m, "model_v1.0", 1000)
    assert m.figures("model_v1.0").requests == 100


def test_evaluate_judges_the_last_interval_only() -> None:
    m = monitor(interval_s=60)
    record(m, "model_v1.0", 20, errors=10)
    health = m.evaluate()["model_v1.0"]
    assert health.version == "model_v1.0"
    assert health.state is VersionState.UNHEALTHY
    assert health.figures.error_rate == 0.5
    later = m.evaluate(now=time.monotonic() + 61)["model_v1.0"]
    assert later.state is VersionState.NO_DATA and later.figures.requests == 0


def test_local_alert_fires_updates_escalates_and_resolves() -> None:
    m = monitor(interval_s=0.3)
    record(m, "model_v1.0", 20, errors=2)  # 10%: over the 5% warning
    [fired] = m.check_local()
    assert (fired.type, fired.severity, fired.state, fired.count) == (
        "error_rate", AlertSeverity.WARNING, AlertState.FIRING, 1)
    assert fired.model_id == "model_v1.0" and "High error rate" in fired.title
    assert "error_rate 10.0% over the warning level 5.0%" in fired.message

    record(m, "model_v1.0", 20, errors=20)  # 22 of 40: critical
    [escalated] = m.check_local()
    assert (escalated.severity, escalated.count) == (AlertSeverity.CRITICAL, 2)
    assert escalated.first_seen == fired.first_seen
    assert escalated.last_seen is not None and fired.last_seen is not None
    assert escalated.last_seen >= fired.last_seen
    assert len(m.local_alerts()) == 1  # one alert per (model key, type)

    time.sleep(0.35)
    record(m, "model_v1.0", 3)  # too few requests: says nothing, nothing resolves
    assert m.check_local() == [] and len(m.local_alerts()) == 1

    record(m, "model_v1.0", 20)
    [resolved] = m.check_local()
    assert resolved.state is AlertState.RESOLVED and resolved.title.startswith("Resolved")
    assert m.local_alerts() == []
    assert m.check_local() == []  # resolved once, not again


def test_too_few_requests_fire_nothing() -> None:
    m = monitor()
    record(m, "model_v1.0", 5, errors=5)
    assert m.check_local() == []


def test_latency_and_custom_metric_alerts_are_separate() -> None:
    m = monitor(latency_p95_warning=200, latency_p95_critical=1000,
                custom={"queue_depth": MetricLimit(warning=10)})
    record(m, "model_v2.0", 20, latency_ms=300)
    m.record_metric("model_v2.0", "queue_depth", 12)
    m.record_metric("model_v2.0", "queue_depth", 14)
    alerts = {a.type: a for a in m.check_local()}
    assert set(alerts) == {"latency", "custom"}
    assert alerts["latency"].severity is AlertSeverity.WARNING
    assert "queue_depth 13 over the warning level 10" in alerts["custom"].message


def test_update_thresholds_validates_and_names_the_key(
        caplog: pytest.LogCaptureFixture) -> None:
    m = monitor()
    before = m.thresholds
    with pytest.raises(ValueError, match="error_rate_warnin"):
        m.update_thresholds({"error_rate_warnin": 0.03})
    with pytest.raises(ValueError, match="error_rate_warning"):
        m.update_thresholds({"error_rate_warning": 2})
    with pytest.raises(ValueError, match="latency_p95_warning"):
        m.update_thresholds({"latency_p95_warning": 20000})  # above the critical level
    assert m.thresholds == before

    # The guide's Best Practice 4; the stack is unreachable: applied here, with a warning.
    applied = m.update_thresholds({"error_rate_warning": 0.03, "latency_p95_warning": 3000})
    assert (applied.error_rate_warning, applied.latency_p95_warning) == (0.03, 3000)
    assert m.thresholds == applied
    assert any("applied in this process only" in r.getMessage() for r in caplog.records)


def test_per_model_thresholds_survive_a_global_change() -> None:
    m = monitor()
    m.update_thresholds({"error_rate_warning": 0.2}, model_id="model_v2.0")
    m.update_thresholds({"latency_p95_warning": 3000})
    mine = m.thresholds_for("model_v2.0")
    assert (mine.error_rate_warning, mine.latency_p95_warning) == (0.2, 3000)
    assert m.thresholds_for("model_v1.0").error_rate_warning == 0.05
    record(m, "model_v2.0", 20, errors=2)  # 10%: under this model's 20%
    record(m, "model_v1.0", 20, errors=2)
    assert [a.model_id for a in m.check_local()] == ["model_v1.0"]


async def test_monitoring_goes_on_without_the_stack_and_says_so_once(
        caplog: pytest.LogCaptureFixture) -> None:
    got: list[Alert] = []
    m = monitor(interval_s=0.1, handlers=[got.append])
    await m.start_monitoring()
    await m.start_monitoring()  # idempotent
    record(m, "model_v1.0", 20, errors=20)
    for _ in range(50):
        if got:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # a few more rounds
    assert m.monitoring
    await m.stop_monitoring()
    assert not m.monitoring
    assert got and got[0].type == "error_rate" and got[0].severity is AlertSeverity.CRITICAL
    outages = [r for r in caplog.records if "unreachable" in r.getMessage()
               and r.name == "turnout.client.health_monitor"]
    assert len(outages) == 1 and outages[0].levelno == logging.WARNING
    await m.stop_monitoring()  # stopping twice is fine


async def test_disabled_monitoring_does_not_start() -> None:
    m = HealthMonitor(settings=ModelSwitchingConfig(enable_health_monitoring=False),
                      api_url=f"http://127.0.0.1:{free_port()}")
    await m.start_monitoring()
    assert not m.monitoring


def test_constructor_shapes_of_the_guide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_MODEL_SWITCHING_MONITORING_INTERVAL_S", "7")
    monkeypatch.setenv("VLLM_MODEL_SWITCHING_ERROR_RATE_WARNING", "0.02")
    system = AlertSystem([print])
    assert HealthMonitor(system).alert_system is system
    assert HealthMonitor(alert_system=system).alert_system is system
    default = HealthMonitor()
    assert default.interval_s == 7 and default.thresholds.error_rate_warning == 0.02
