"""Loaders for official checkpoint formats, from local files only.

Shared machinery (`local_path`, `read_state_dict`, `load_official_state`) is used by the per-method loaders:
`tokenomy.generation.rar.load_rar`, `tokenomy.generation.arpg.load_arpg`,
`tokenomy.tokenizers.llamagen_vq.load_llamagen_vq`, `tokenomy.tokenizers.titok_official.load_titok`,
`tokenomy.tokenizers.flextok_official.load_flextok_encoder`.

- RandAR `.safetensors` state dicts (ziqipang/RandAR, LlamaGen-style GPT) -> our `RandAR`, strict, shapes checked.
- FlexTok `model.safetensors`: the Hydra config stored as Python literals in the safetensors `__metadata__`
  header is parsed (never instantiated) into the hyper-parameters our classes need.
- `.pt` / `.bin` checkpoints are read with `torch.load(weights_only=True)` and unwrapped from the usual
  `model` / `module` / `state_dict` / `ema` wrappers.
"""
from __future__ import annotations

import ast
import json
import pickle
import re
import struct
from pathlib import Path

import torch

from tokenomy.errors import ModelLoadError

# (depth, width) -> heads of the released RandAR / LlamaGen sizes
RANDAR_HEADS = {(24, 1024): 16, (36, 1280): 20, (48, 1536): 24}
_RANDAR_LAYER_KEYS = {
    "attention.wqkv.weight": "attention.qkv.weight",
    "attention.wo.weight": "attention.proj.weight",
    "feed_forward.w1.weight": "ffn.gate.weight",
    "feed_forward.w3.weight": "ffn.up.weight",
    "feed_forward.w2.weight": "ffn.down.weight",
    "attention_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_RANDAR_TOP_KEYS = {
    "tok_embeddings.weight": "token_embed.weight",
    "cls_embedding.embedding_table.weight": "class_embed.weight",
    "norm.weight": "trunk.norm.weight",
    "output.weight": "trunk.head.weight",
}


def local_path(path, folder: bool = False) -> Path:
    """`path` as an existing local file (or folder); anything else, a hub id included, is a ModelLoadError."""
    resolved = Path(path)
    if resolved.is_dir() if folder else resolved.is_file():
        return resolved
    # "owner/name" that is not on disk is almost surely a model-hub id: say so instead of a bare "not found"
    hub_hint = (" (it looks like a model-hub id; tokenomy never downloads)"
                if isinstance(path, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not resolved.parent.is_dir() else "")
    what = "folder" if folder else "file"
    raise ModelLoadError(f"checkpoint {what} {path} not found{hub_hint}; only local paths are loaded (download it yourself first)")


def _local_file(path) -> Path:
    return local_path(path)


def load_torch_state_dict(path) -> dict[str, torch.Tensor]:
    """A `.pt`/`.bin` checkpoint as a flat state dict, unwrapping model/module/state_dict/ema containers."""
    try:
        checkpoint = torch.load(_local_file(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # e.g. training checkpoints that also pickle an argparse Namespace: never unpickle arbitrary objects
        raise ModelLoadError(f"{path} holds objects other than tensors and cannot be read with weights_only=True; "
                             f"re-save its state dict alone (torch.save(ckpt['model'], ...)) in a trusted session: {exc}") from exc
    for key in ("model", "module", "state_dict", "ema"):
        if isinstance(checkpoint, dict) and key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ModelLoadError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Tensors of a local `.safetensors` file, or of a `.pt`/`.bin` checkpoint read with weights_only=True."""
    from safetensors.torch import load_file

    path = local_path(path)
    return load_file(str(path)) if path.suffix == ".safetensors" else load_torch_state_dict(path)


def require_keys(state: dict, keys, source) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ModelLoadError(f"{source}: missing keys {missing} (not a checkpoint of the expected kind)")


def _listing(keys: list[str]) -> str:
    return f"{keys[:8]}{f' and {len(keys) - 8} more' if len(keys) > 8 else ''}"


def load_official_state(model: torch.nn.Module, state: dict[str, torch.Tensor], table: dict[str, str], source,
                        ignored: tuple[str, ...] = ()):
    """Load `state` (official key names) into `model` through `table` (official key -> our key), strictly.

    Missing and unexpected keys, and tensors whose shape differs from the one the config implies, are reported by
    their official names before anything is loaded. `ignored` official keys (training statistics) are dropped.
    """
    unexpected = [k for k in state if k not in table and k not in ignored]
    missing = [k for k in table if k not in state]
    if missing or unexpected:
        raise ModelLoadError(f"{source}: missing keys {_listing(missing)}, unexpected keys {_listing(unexpected)}")
    expected = model.state_dict()
    unmapped = sorted(set(expected) - set(table.values()))
    if unmapped:  # the table itself is incomplete: a bug here, not in the checkpoint
        raise ModelLoadError(f"{source}: key table leaves model parameters {_listing(unmapped)} unset")
    wrong = [f"{k}: {tuple(state[k].shape)} (expected {tuple(expected[ours].shape)})" for k, ours in table.items()
             if state[k].shape != expected[ours].shape]
    if wrong:
        raise ModelLoadError(f"{source}: shape mismatch for {_listing(wrong)}")
    model.load_state_dict({ours: state[k] for k, ours in table.items()}, strict=True)
    return model.eval()


def randar_state_dict_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mapped, unexpected = {}, []
    for key, value in state.items():
        if key in _RANDAR_TOP_KEYS:
            mapped[_RANDAR_TOP_KEYS[key]] = value
        elif key == "pos_instruct_embeddings":
            mapped["instruction"] = value.reshape(-1)
        elif (match := re.fullmatch(r"layers\.(\d+)\.(.+)", key)) and match.group(2) in _RANDAR_LAYER_KEYS:
            mapped[f"trunk.blocks.{match.group(1)}.{_RANDAR_LAYER_KEYS[match.group(2)]}"] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise ModelLoadError(f"unexpected keys in RandAR checkpoint: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    return mapped


def load_randar(path, heads: int | None = None, grid: int = 16, num_classes: int | None = None):
    """Build our `RandAR` from an official RandAR `.safetensors` (or `.pt`) state dict; strict key and shape check."""
    from safetensors.torch import load_file

    from tokenomy.generation.base import ARConfig
    from tokenomy.generation.randar import RandAR

    path = _local_file(path)
    state = load_file(str(path)) if path.suffix == ".safetensors" else load_torch_state_dict(path)
    required = ["tok_embeddings.weight", "cls_embedding.embedding_table.weight", "output.weight", "pos_instruct_embeddings"]
    missing = [k for k in required if k not in state]
    if missing:
        raise ModelLoadError(f"{path} is not a RandAR checkpoint: missing {missing}")
    vocab, width = state["tok_embeddings.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k)))
    heads = heads or RANDAR_HEADS.get((depth, width))
    if heads is None:
        raise ModelLoadError(f"cannot infer the head count of a RandAR model with depth {depth}, width {width}; pass heads=")
    hidden = state["layers.0.feed_forward.w1.weight"].shape[0]
    table_rows = state["cls_embedding.embedding_table.weight"].shape[0]
    classes = num_classes if num_classes is not None else table_rows - 1  # the last row is the CFG null class
    multiple = next((m for m in (256, 128, 64, 32, 16, 8) if swiglu_hidden(width, m) == hidden), None)
    if multiple is None:
        raise ModelLoadError(f"FFN hidden size {hidden} of {path} does not follow LlamaGen's rounding for width {width}")
    model = RandAR(ARConfig(vocab_size=vocab, num_classes=classes, grid_rows=grid, grid_cols=grid, width=width, depth=depth,
                            heads=heads, class_dropout=0.0, ffn_multiple_of=multiple))
    mapped = randar_state_dict_to_ours(state)
    expected = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in mapped.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise ModelLoadError(f"shape mismatch loading {path}: {wrong[:5]}")
    result = model.load_state_dict(mapped, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(f"{path}: missing keys {result.missing_keys[:8]}, unexpected keys {result.unexpected_keys[:8]}")
    return model.eval()


def swiglu_hidden(width: int, multiple_of: int) -> int:
    hidden = int(2 * 4 * width / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def read_safetensors_metadata(path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors header (8-byte little-endian length, then JSON)."""
    with open(_local_file(path), "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return header.get("__metadata__", {})


def read_flextok_config(path) -> dict:
    """Parse the Hydra config FlexTok stores in its safetensors metadata, without instantiating any `_target_`."""
    metadata = read_safetensors_metadata(path)
    config = {}
    for key, text in metadata.items():
        try:
            config[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError) as exc:
            raise ModelLoadError(f"metadata entry {key!r} of {path} is not a Python literal: {exc}") from exc
    missing = [k for k in ("encoder", "decoder", "regularizer") if k not in config]
    if missing:
        raise ModelLoadError(f"{path} has no FlexTok config in its metadata (missing {missing})")
    return config


def flextok_hyperparameters(config: dict) -> dict:
    """Dims, depths, register count and FSQ levels read from a parsed FlexTok config (searched by field name)."""

    def find(tree, names):
        if isinstance(tree, dict):
            for name in names:
                if name in tree and not isinstance(tree[name], (dict, list)):
                    return tree[name]
                if name in tree and isinstance(tree[name], list) and all(isinstance(v, int) for v in tree[name]):
                    return tree[name]
            for value in tree.values():
                found = find(value, names)
                if found is not None:
                    return found
        elif isinstance(tree, list):
            for value in tree:
                found = find(value, names)
                if found is not None:
                    return found
        return None

    out = {
        "encoder_dim": find(config["encoder"], ["dim", "d_model", "width"]),
        "encoder_depth": find(config["encoder"], ["depth", "n_layers", "num_layers"]),
        "decoder_dim": find(config["decoder"], ["dim", "d_model", "width"]),
        "decoder_depth": find(config["decoder"], ["depth", "n_layers", "num_layers"]),
        "num_registers": find(config["encoder"], ["n_max", "num_registers", "n_registers"]),
        "levels": find(config["regularizer"], ["levels"]),
    }
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise ModelLoadError(f"FlexTok config lacks {missing}")
    return out
