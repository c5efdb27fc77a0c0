"""What users hold in their own processes beside the SDK: the `turnout` command and its
live views, and the guide's in-process `HealthMonitor`."""
