"""raysft.pipeline.training: one optimizer step without Ray (step.py), the Ray Train worker loop
(loop.py), its data order, checkpoints, ledger and metrics. The public entry point is
`raysft.pipeline.train` (trainer.py)."""
