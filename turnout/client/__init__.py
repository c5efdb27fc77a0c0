"""What users hold: the `turnout` command and its live views."""
