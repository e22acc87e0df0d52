"""The encoder half of the released FlexTok tokenizers (apple/ml-flextok): images -> ordered 1D token ids.

Pipeline, as the Hydra config stored in the checkpoint's safetensors metadata describes it (never instantiated
here: each module's `_target_` class is recognised and its arguments read):
diffusers AutoencoderKL (posterior mode or sample, times `scaling_factor`) -> channels last -> `PatchEmbedder`
(p x p patches, channels fastest, linear) -> `PositionalEmbeddingAdder` (a stored [1, D, H, W] table, sliced)
-> `Registers1D` (the first n learned registers) -> `BlockWiseSequencePacker` with the `causal_last` mask (patches
see all patches; register i sees all patches and registers <= i) -> `FlexTransformer` (pre-LN blocks without affine
norms, QK-LayerNorm, attention scale 8/head_dim, SiLU-gated MLP) -> registers -> `LinearHead` (LayerNorm, linear) ->
FSQ. The rectified-flow decoder is in `flextok_official_decoder` (`load_flextok` loads both halves); this encoder
loader skips the `decoder.*` weights.

`load_flextok_encoder` reads `model.safetensors` (local path only).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokenomy.errors import InputError, ModelLoadError
from tokenomy.tokenizers.fsq import FSQ

# the AutoencoderKL the official StableDiffusionVAE wrapper builds when no hub path is given (latent channels vary)
FLEXTOK_VAE_CONFIG = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_PARAMETER_FREE = ("PerSampleOp", "BlockWiseSequencePacker", "SequenceUnpacker")


def _class_name(module_config: dict) -> str:
    return str(module_config.get("_target_", "")).rsplit(".", 1)[-1]


def _target_name(spec) -> str:
    """Class or function name of a Hydra `_target_` given as a dict or as a dotted string."""
    return _class_name(spec) if isinstance(spec, dict) else str(spec or "").rsplit(".", 1)[-1]


def unported_layers(module: dict, norm_may_be_none: bool = False) -> list[str]:
    """The `norm_layer` / `act_layer` options of a module config that differ from the ported ones: a LayerNorm
    without parameters (the official default, Fp32LayerNorm) and SiLU. Each is described for an error message."""
    problems = []
    norm = module.get("norm_layer", {"_target_": "Fp32LayerNorm", "elementwise_affine": False, "bias": False})
    if not (norm is None and norm_may_be_none) and (
            not isinstance(norm, dict) or _target_name(norm) != "Fp32LayerNorm" or norm.get("elementwise_affine", True) or norm.get("bias", True)):
        problems.append(f"norm_layer {norm!r} (only Fp32LayerNorm without affine parameters is ported)")
    if "act_layer" in module and _target_name(module["act_layer"]) != "SiLU":
        problems.append(f"act_layer {module['act_layer']!r} (only SiLU is ported)")
    return problems


class FlexAttentionBlock(nn.Module):
    """FlexTok's FlexBlock: x += attn(LN(x)); x += gated MLP(LN(x)); LayerNorms without parameters."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float, qkv_bias: bool, proj_bias: bool, mlp_bias: bool):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=qkv_bias) for _ in range(3))
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        hidden = int(2 * int(dim * mlp_ratio) / 3)
        self.fc1, self.fc3 = nn.Linear(dim, hidden, bias=mlp_bias), nn.Linear(dim, hidden, bias=mlp_bias)
        self.fc2 = nn.Linear(hidden, dim, bias=mlp_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        h = F.layer_norm(x.float(), (dim,)).type_as(x)
        q, k, v = (f(h).view(batch, length, self.heads, self.head_dim).transpose(1, 2) for f in (self.wq, self.wk, self.wv))
        q, k = F.layer_norm(q.float(), (self.head_dim,)).type_as(q), F.layer_norm(k.float(), (self.head_dim,)).type_as(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=8.0 / self.head_dim)  # muP scaling
        x = x + self.proj(out.transpose(1, 2).reshape(batch, length, dim))
        h = F.layer_norm(x.float(), (dim,)).type_as(x)
        return x + self.fc2(F.silu(self.fc1(h)) * self.fc3(h))


class FlexTokEncoder(nn.Module):
    """Images in [-1, 1] -> FlexTok ids [B, n_registers]; every prefix of the ids is a valid coarser description."""

    def __init__(self, config: dict, vae_config: dict | None = None):
        super().__init__()
        from diffusers.models import AutoencoderKL

        self.config = config
        self.names = names = _encoder_modules(config)
        modules = config["encoder"]["module_dict"]
        vae = config.get("vae") or {}
        self.vae = AutoencoderKL.from_config({**FLEXTOK_VAE_CONFIG, **(vae_config or {}), "latent_channels": vae.get("latent_channels", 16)})
        self.scaling_factor = vae.get("scaling_factor") or self.vae.config.scaling_factor
        self.sample_posterior = vae.get("sample_posterior", True)
        patching, posemb, registers = modules[names["PatchEmbedder"]], modules[names["PositionalEmbeddingAdder"]], modules[names["Registers1D"]]
        trunk, head = modules[names["FlexTransformer"]], modules[names["LinearHead"]]
        self.patch_sizes = tuple(patching["patch_sizes"])
        dim = trunk.get("dim", 768)
        self.patch_embed = nn.Linear(patching["channels_in"] * math.prod(self.patch_sizes), patching.get("dim") or dim)
        max_sizes = posemb["max_sizes"]
        self.posembs = nn.Parameter(torch.zeros(1, posemb["dim"], *max_sizes), requires_grad=False)
        self.num_registers = registers.get("n_eval") or registers["n_max"]
        self.registers = nn.Parameter(torch.zeros(registers["n_max"], registers["dim"]))
        self.blocks = nn.ModuleList(
            FlexAttentionBlock(dim, trunk.get("head_dim", 64), trunk.get("mlp_ratio", 4.0), trunk.get("qkv_bias", False),
                               trunk.get("proj_bias", False), trunk.get("mlp_bias", False))
            for _ in range(trunk.get("depth", 12)))
        self.head_norm = head.get("norm_layer", "default") is not None  # LinearHead: norm_layer=None is nn.Identity
        self.head = nn.Linear(head["dim"], head["dim_out"], bias=head.get("proj_bias", True))
        self.fsq = FSQ(config["regularizer"]["levels"])

    @property
    def num_tokens(self) -> int:
        return self.num_registers

    def vae_latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        return latents * self.scaling_factor

    def register_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents [B, C, H, W] -> pre-FSQ register outputs [B, n, levels]."""
        batch, channels, height, width = latents.shape
        ph, pw = self.patch_sizes
        rows, cols = height // ph, width // pw
        # (rows ph) (cols pw) c -> rows cols (ph pw c): channels vary fastest inside a patch
        patches = latents.permute(0, 2, 3, 1).reshape(batch, rows, ph, cols, pw, channels).permute(0, 1, 3, 2, 4, 5)
        x = self.patch_embed(patches.reshape(batch, rows, cols, ph * pw * channels))
        x = (x + self.posembs[0, :, :rows, :cols].permute(1, 2, 0)).reshape(batch, rows * cols, -1)
        x = torch.cat([x, self.registers[: self.num_registers].expand(batch, -1, -1)], 1)
        num_patches, total = rows * cols, x.shape[1]
        # causal_last: every query sees the patch prefix, and keys up to itself
        index = torch.arange(total, device=x.device)
        mask = (index[None] < num_patches) | (index[None] <= index[:, None])
        for block in self.blocks:
            x = block(x, mask)
        registers = x[:, num_patches:]
        if self.head_norm:
            registers = F.layer_norm(registers.float(), (registers.shape[-1],)).type_as(registers)
        return self.head(registers)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"FlexTok encodes images [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        return self.fsq(self.register_latents(self.vae_latents(images, generator)))[1]


def _encoder_modules(config: dict) -> dict[str, str]:
    """Module name of each recognised class in the encoder's module_dict; anything else is refused by name."""
    try:
        modules = config["encoder"]["module_dict"]
    except (KeyError, TypeError) as exc:
        raise ModelLoadError("FlexTok config has no encoder.module_dict") from exc
    names, unknown = {}, []
    for name, module in modules.items():
        kind = _class_name(module)
        if kind in _PARAMETER_FREE:
            if kind == "BlockWiseSequencePacker" and module.get("mask_mode") != "causal_last":
                raise ModelLoadError(f"FlexTok encoder module {name}: mask_mode {module.get('mask_mode')!r} (only 'causal_last' is ported)")
            continue
        if kind not in ("PatchEmbedder", "PositionalEmbeddingAdder", "Registers1D", "FlexTransformer", "LinearHead") or kind in names:
            unknown.append(f"{name} ({kind})")
            continue
        names[kind] = name
    missing = {"PatchEmbedder", "PositionalEmbeddingAdder", "Registers1D", "FlexTransformer", "LinearHead"} - set(names)
    if unknown or missing:
        raise ModelLoadError(f"FlexTok encoder layout not supported: unexpected modules {unknown}, missing {sorted(missing)}")
    trunk = modules[names["FlexTransformer"]]
    if not trunk.get("gated_mlp", True) or not trunk.get("qk_norm", True) or trunk.get("adaLN_emb_read_key"):
        raise ModelLoadError(f"FlexTok encoder trunk {names['FlexTransformer']}: only gated-MLP, QK-norm blocks without adaLN are ported")
    if modules[names["Registers1D"]].get("ordering_mode", "nested") != "nested":
        raise ModelLoadError("FlexTok encoder registers: only ordering_mode 'nested' is ported")
    if modules[names["LinearHead"]].get("use_mup_readout"):
        raise ModelLoadError("FlexTok encoder head with a muP readout is not ported")
    for kind, norm_may_be_none in (("FlexTransformer", False), ("LinearHead", True)):
        problems = unported_layers(modules[names[kind]], norm_may_be_none)
        if problems:
            raise ModelLoadError(f"FlexTok encoder module {names[kind]} ({kind}): {'; '.join(problems)} not ported")
    return names


def flextok_encoder_key_table(model: FlexTokEncoder) -> dict[str, str]:
    """Official key -> our key, built from the module names of the checkpoint's own config."""
    prefix = {kind: f"encoder.module_dict.{name}." for kind, name in model.names.items()}
    table = {f"vae.vae.{k}": f"vae.{k}" for k in model.vae.state_dict()}
    table.update({prefix["PatchEmbedder"] + "patch_proj.weight": "patch_embed.weight",
                  prefix["PatchEmbedder"] + "patch_proj.bias": "patch_embed.bias",
                  prefix["PositionalEmbeddingAdder"] + "posembs": "posembs",
                  prefix["Registers1D"] + "registers": "registers"})
    for ours in model.head.state_dict():
        table[prefix["LinearHead"] + "proj." + ours] = "head." + ours
    for ours in model.blocks.state_dict():
        index, name, leaf = ours.split(".")
        official = {"wq": "attn.wq", "wk": "attn.wk", "wv": "attn.wv", "proj": "attn.proj",
                    "fc1": "mlp.fc1", "fc2": "mlp.fc2", "fc3": "mlp.fc3"}[name]
        table[f"{prefix['FlexTransformer']}blocks.{index}.{official}.{leaf}"] = f"blocks.{ours}"
    return table


def load_flextok_encoder(path, vae_config: dict | None = None) -> FlexTokEncoder:
    """The encoder half (VAE + encoder + FSQ) of an official FlexTok `model.safetensors`, from a local file or a
    folder holding it. Strict over `vae.*` and `encoder.*`; the flow decoder's `decoder.*` weights are skipped.
    `vae_config` overrides the AutoencoderKL layout (the released models use the default; tests use tiny ones)."""
    from safetensors.torch import load_file

    from tokenomy.generation.loaders import load_official_state, local_path, read_flextok_config

    resolved = Path(path)
    path = local_path(resolved / "model.safetensors" if resolved.is_dir() else path)
    model = FlexTokEncoder(read_flextok_config(path), vae_config)
    # activation-checkpoint wrappers may leave their prefix in saved keys
    state = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in load_file(str(path)).items()}
    decoder_keys = tuple(k for k in state if k.startswith("decoder."))
    return load_official_state(model, state, flextok_encoder_key_table(model), path, ignored=decoder_keys)
