"""Data-parallel layer: rank discovery (env.py) and backends (backends.py). See docs/distributed.md."""
from .backends import (Backend, CollectiveError, HorovodBackend, NoneBackend, TorchBackend,
                       collective_failure_message, make_backend, select_device)
from .env import RankEnv, discover, expand_nodelist

__all__ = ["Backend", "CollectiveError", "HorovodBackend", "NoneBackend", "TorchBackend", "RankEnv",
           "collective_failure_message", "discover", "expand_nodelist", "make_backend", "select_device"]
