"""Local checkpoint folders of tokenomy's own models: config.json (with the model `kind`) + model.safetensors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from tokenomy.errors import ModelLoadError, UnknownNameError


def save_checkpoint(directory, kind: str, config, module) -> None:
    """Write `config` (a dataclass) tagged with `kind`, and the module's weights, into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"kind": kind, **dataclasses.asdict(config)}, indent=2))
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(directory / "model.safetensors"))


def load_checkpoint(directory, what: str, registry: dict, build):
    """Rebuild a model saved by `save_checkpoint`: `build(cls, config_dict)` makes it, then the weights load strictly."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelLoadError(f"{directory} lacks config.json or model.safetensors (a local {what} folder is required)")
    config = json.loads(config_path.read_text())
    kind = config.pop("kind", None)
    if kind not in registry:
        raise UnknownNameError(what, str(kind), registry)
    model = build(registry[kind], config)
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    return model.eval()
