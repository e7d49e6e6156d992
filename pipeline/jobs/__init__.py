"""raysft.pipeline.jobs: Ray Jobs on a running cluster: `raysft submit/status/logs/stop` (submit.py) and
what a job ships (package.py)."""
