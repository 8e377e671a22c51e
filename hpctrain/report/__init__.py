"""Reports of a sweep, used by ``hpctrain collect``.

runs.py reads a sweep folder into memory once; ranking.py picks each run's best value and
orders the runs; tables.py, curves.py, plots.py and tensorboard.py write the outputs;
best.py exports the best run and loading.py turns its checkpoint back into a model.
live_tb.py writes a run's TensorBoard events while it trains (called by the runner).
"""
