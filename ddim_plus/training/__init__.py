"""The building blocks of `ddim_plus.train`: data, loss, EMA and checkpoints.

They live in the package rather than in the script so that tests and `benchmarks/bench_train.py` call exactly the
code the trainer runs, and so that the trainer runs from an installed wheel (`python -m ddim_plus.train`).
"""
