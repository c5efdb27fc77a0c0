"""One contract for measured figures (DESIGN.md, "Telemetry, one contract").

- `catalogue`: every metric turnout measures per version, defined once (name, source of
  its samples, kind, quantile, direction, unit, label, the field that holds it);
- `sketch`: mergeable histograms of per-request samples, the form windows travel in;
- `figures`: the one figures model of a version over a window, and the window's samples;
- `statistics`: the one quantile function and the two-sample tests;
- `verdicts`: a rollout step's verdict, target against stable;
- `health`: the monitor's judgment of one version against warning and critical levels;
- `alerts`: the alert lifecycle shared by the stack's monitor and the in-process
  `HealthMonitor`.

Pure code: nothing here does I/O.
"""
