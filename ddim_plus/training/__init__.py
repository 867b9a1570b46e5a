"""The building blocks of `ddim_plus.train`: its command line (`args`), data, loss, EMA, checkpoints, and what a
run leaves behind (`outputs`).

They live in the package rather than in the script so that tests and `benchmarks/bench_train.py` call exactly the
code the trainer runs, and so that the trainer runs from an installed wheel (`python -m ddim_plus.train`). None of
them imports `ddim_plus.evaluation`: the trainer, one layer up, samples and scores.
"""
