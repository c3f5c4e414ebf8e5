"""The application: the `vitlab` command, inference, attention rollout maps and the demo page."""
