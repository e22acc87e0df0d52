"""Reduction plans: several reducers in one request, written as one spec string.

Grammar (Python and CLI alike): stages joined by `+`; a stage is a registered name (one may end in `+`:
`prumerge++fastv` is prumerge+ then fastv), optionally followed by `:` and
`key=value` options joined by `,`. The call's `keep` sets the last stage's budget. Example: `vtc-cls:keep=32+fastv`
with keep=16 keeps 32 tokens before the LLM and 16 after LLM layer 2. Stages run in site order (encoder,
pre-projector, post-projector, LLM); a spec that orders them otherwise is refused.
"""
from __future__ import annotations

import inspect
import re

from tokenomy.errors import InputError
from tokenomy.options import parse_value
from tokenomy.reducers.base import SITE_ORDER, PositionPolicy, Reducer, Site
from tokenomy.reducers.registry import create, registered

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*\+?$")
# A '+' joins two stages unless it ends a name ("prumerge+"): then a ':', another '+' or the end follows it.
_STAGE_JOIN = re.compile(r"\+(?![:+]|\s*$)")


def parse_spec(spec: str) -> list:
    """'a:k=v,k2=v2+b' -> [('a', {'k': v, 'k2': v2}), ('b', {})], refusing malformed text with the culprit named."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"reducer spec must be a non-empty string like 'vtc-cls:keep=64+fastv', got {spec!r}")
    stages = []
    for text in _STAGE_JOIN.split(spec):
        name, _, option_text = text.strip().partition(":")
        name = name.strip()
        if not _NAME.match(name):
            raise InputError(f"reducer spec {spec!r}: stage {text!r} does not start with a reducer name")
        options = {}
        if ":" in text:
            for item in option_text.split(","):
                key, equals, value = item.partition("=")
                key = key.strip()
                if not equals or not key.isidentifier():
                    raise InputError(f"reducer spec {spec!r}: option {item!r} of {name!r} is not of the form key=value")
                if key in options:
                    raise InputError(f"reducer spec {spec!r}: option {key!r} of {name!r} is given twice")
                options[key] = parse_value(value.strip())
        stages.append((name, options))
    return stages


def split_spec_list(text: str) -> list:
    """Split a comma list of specs ('random,vtc-cls:keep=32,start_layer=4+fastv'): a piece whose first stage has
    '=' but no ':' continues the options of the piece before it."""
    pieces = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        head = piece.split("+", 1)[0]
        if pieces and "=" in head and ":" not in head:
            pieces[-1] += "," + piece
        else:
            pieces.append(piece)
    return pieces


def _accepts(cls, key: str) -> bool:
    parameters = inspect.signature(cls.__init__).parameters
    return key in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


class Plan:
    """The stages of one request, in site order. `spec` is the canonical string the stages were built from."""

    def __init__(self, stages: list, spec: str):
        if not stages:
            raise InputError("a reduction plan needs at least one stage")
        for earlier, later in zip(stages, stages[1:]):
            if SITE_ORDER[later.site] < SITE_ORDER[earlier.site]:
                raise InputError(
                    f"reducer spec {spec!r}: {later.name!r} acts at the {later.site.value} site, which comes before the "
                    f"{earlier.site.value} site of {earlier.name!r}; order the stages encoder + pre_projector + "
                    "post_projector + llm"
                )
        self.stages = list(stages)
        self.spec = spec

    @property
    def last(self) -> Reducer:
        return self.stages[-1]

    @property
    def keep(self):
        return self.last.keep if self.last.applies_budget else None

    @property
    def name(self) -> str:
        return "+".join(stage.name for stage in self.stages)

    def at(self, site: Site) -> list:
        return [stage for stage in self.stages if stage.site is site]

    def required_policy(self):
        """The position policy a stage insists on (multi for PPE), or None."""
        wanted = {stage.position_policy for stage in self.stages if stage.position_policy is not None}
        if len(wanted) > 1:
            raise InputError(f"reducer spec {self.spec!r}: stages need different position policies {sorted(p.value for p in wanted)}")
        return next(iter(wanted), None)

    def positions_per_token(self) -> int:
        return max(stage.positions_per_token for stage in self.stages)

    def multi_rotary(self, text_config):
        for stage in self.stages:
            rotary = stage.multi_rotary(text_config)
            if rotary is not None:
                return rotary
        return None

    def __repr__(self) -> str:
        return f"Plan({self.stages})"


def build_plan(reducer, keep=None, **options) -> Plan:
    """A Plan from a spec string, a Reducer, a list of Reducers, or a Plan.

    `keep` sets the last stage's budget. `options`: `name.key=value` goes to the stages called `name` (and is ignored
    when there is none, so one sweep can carry options for several reducers); a plain `key=value` goes to every stage
    that accepts it, and must be accepted by at least one.
    """
    if isinstance(reducer, Plan):
        if keep is not None or options:
            raise InputError("pass keep and options in the spec string or to build_plan, not with a ready Plan")
        return reducer
    if isinstance(reducer, Reducer) or (isinstance(reducer, (list, tuple)) and all(isinstance(r, Reducer) for r in reducer)):
        stages = [reducer] if isinstance(reducer, Reducer) else list(reducer)
        if keep is not None or options:
            raise InputError("a ready Reducer object carries its own keep and options; pass a spec string to set them")
        return Plan(stages, "+".join(stage.name for stage in stages))
    parsed = parse_spec(reducer)
    known = registered()
    for name, _ in parsed:
        if name not in known:
            create(name)  # raises UnknownNameError listing the known reducers
    plain = {k: v for k, v in options.items() if "." not in k}
    for key in plain:
        if not any(_accepts(known[name], key) for name, _ in parsed):
            accepted = sorted({p for name, _ in parsed for p in inspect.signature(known[name].__init__).parameters} - {"self"})
            raise InputError(f"reducer spec {reducer!r}: no stage accepts option {key!r}; options: {accepted}")
    stages = []
    for index, (name, stage_options) in enumerate(parsed):
        merged = {k: v for k, v in plain.items() if _accepts(known[name], k)}
        merged.update({k.split(".", 1)[1]: v for k, v in options.items() if k.split(".", 1)[0] == name and "." in k})
        merged.update(stage_options)
        if index == len(parsed) - 1 and keep is not None:
            if "keep" in stage_options and stage_options["keep"] != keep:
                raise InputError(f"reducer spec {reducer!r}: the last stage sets keep={stage_options['keep']} but keep={keep} was also given")
            merged["keep"] = keep
        stages.append(create(name, **merged))
    return Plan(stages, reducer.strip())


__all__ = ["Plan", "PositionPolicy", "build_plan", "parse_spec", "split_spec_list"]
