"""raysft.pipeline.demo: `raysft demo` (run.py), its generated task (task.py), the before/after
evaluation (evaluate.py), the report (report.py) and its config (demo.yaml, package data)."""
