"""hpctrain: grid-search neural networks on Slurm clusters, data-parallel over MPI."""

__version__ = "0.1.0"


def load_best(sweep_dir, **kwargs):
    """The best model of a collected sweep, in eval mode, with its input standardisation."""
    from .collect import load_best as _load_best

    return _load_best(sweep_dir, **kwargs)
