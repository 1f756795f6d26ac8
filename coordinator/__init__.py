"""The coordinator: the CLI and the Python API that plan, deploy, run, benchmark and watch a
pipeline, re-planning around nodes that fail, and a simulated cluster on this machine."""
