"""raysft.pipeline.sweep: `raysft tune` (run.py), its search space (space.py) and its report (report.py).
The public entry point is `raysft.pipeline.tune`."""
