"""The coordinator: CLI and Python API to plan, deploy, run and benchmark a pipeline."""
