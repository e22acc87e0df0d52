"""Reducer registry: `available()`, `create(name, **kwargs)`, and the `register` decorator."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from tokenomy.errors import InputError, UnknownNameError

_REGISTRY: dict = {}


def register(name: str):
    def decorate(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _discover() -> None:
    """Import every module of tokenomy.reducers, so a new reducer file registers itself without edits elsewhere."""
    import tokenomy.reducers as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in ("base", "registry", "plan"):
            importlib.import_module(f"tokenomy.reducers.{info.name}")


def available(images: bool = False) -> list:
    """Registered reducer names; images=True: only those that reduce image tokens to a `keep` budget."""
    _discover()
    return sorted(name for name, cls in _REGISTRY.items() if cls.reduces_images or not images)


def registered() -> dict:
    """Name -> reducer class, every reducer file imported."""
    _discover()
    return dict(_REGISTRY)


def create(name: str, **kwargs):
    _discover()
    if name not in _REGISTRY:
        from tokenomy.eval.oracles import DIAGNOSTICS  # lazily: the diagnostics live with the benchmark that feeds them

        if name in DIAGNOSTICS:
            raise InputError(f"{name!r} is a synthvqa diagnostic, not a reducer: it needs each sample's scene description, "
                             f"which only `tokenomy eval --tasks synthvqa --reducers {name}` hands over")
        raise UnknownNameError("reducer", name, _REGISTRY)
    cls = _REGISTRY[name]
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            options = sorted(p for p in accepted if p != "self")
            raise InputError(f"reducer {name!r} got unknown option(s) {unknown}; it accepts {options}")
    return cls(**kwargs)


def describe() -> list:
    """One dict per registered reducer, by name: site, default position policy, options with their defaults (from
    the constructor's signature), description and paper; what `tokenomy eval --reducers list` prints."""
    from tokenomy.reducers.base import Site

    rows = []
    for name, cls in registered().items():
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        options = {p.name: p.default for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if cls.position_policy is not None:
            policy = cls.position_policy.value
        elif cls.site is Site.LLM:
            policy = "keep (tokens dropped in the LLM leave their position ids)"
        else:
            policy = "the family's (contiguous on LLaVA, keep on Qwen)"
        rows.append(dict(name=name, site=cls.site.value, position_policy=policy, options=options,
                         description=cls.description, paper=cls.paper))
    return sorted(rows, key=lambda row: row["name"])
