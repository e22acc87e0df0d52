"""Token reducers: one file per method, registered by name."""
from tokenomy.reducers.base import ImageTokens, PositionPolicy, Reducer, Selection, Stage
from tokenomy.reducers.registry import available, create, register

__all__ = ["ImageTokens", "PositionPolicy", "Reducer", "Selection", "Stage", "available", "create", "register"]
