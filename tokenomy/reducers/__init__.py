"""Token reducers: one file per method, registered by name; plans stack them."""
from tokenomy.reducers.base import ImageTokens, PositionPolicy, Reducer, Selection, Site
from tokenomy.reducers.plan import Plan, build_plan, parse_spec
from tokenomy.reducers.registry import available, create, register

__all__ = [
    "ImageTokens", "Plan", "PositionPolicy", "Reducer", "Selection", "Site", "available", "build_plan", "create",
    "parse_spec", "register",
]
