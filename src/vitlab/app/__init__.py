"""The application: the `vitlab` command, inference, attention rollout maps, the demo page and the
Hugging Face Space that deploys it."""
