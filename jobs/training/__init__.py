"""The training runtime: a plain PyTorch loop (loop.py), checkpoints on the run's storage
(checkpoint.py), the Ray Train worker function (worker.py) and the launcher (run.py)."""
