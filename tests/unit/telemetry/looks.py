"""One look at a version, as the monitor's rules see it (shared by the health and alert
tests)."""

from __future__ import annotations

from typing import Any

from turnout.telemetry.figures import Figures
from turnout.telemetry.health import MonitorThresholds, VersionHealth, evaluate

T = MonitorThresholds()


def busy(**figures: Any) -> Figures:
    """Figures of a version with enough requests to be judged on its rates."""
    return Figures(requests=100, **figures)


def health(version: str, figures: Figures,
           thresholds: MonitorThresholds = T) -> VersionHealth:
    return evaluate(figures, thresholds).model_copy(update={"version": version})
