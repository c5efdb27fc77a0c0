"""What users hold in their own processes beside the SDK: the guide's in-process
`HealthMonitor` (DESIGN.md's map; the SDK and CLI are still at `turnout.sdk` and
`turnout.cli`)."""
