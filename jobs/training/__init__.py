"""The training runtime: a plain PyTorch loop (loop.py), checkpoints on the run's storage
(checkpoint.py), the worker's session protocol and its Ray Train and in-process implementations
(session.py), each rank's loop (worker.py) and the launchers (run.py)."""
