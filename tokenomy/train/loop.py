"""The reference-model training loop, meant to be read top to bottom.

    data (synthvqa stream or a vqa-jsonl folder) -> multi-turn conversations -> answer-only cross-entropy -> AdamW
    with warmup + cosine decay -> a resumable checkpoint every `save_every` steps -> a transformers folder at the end.

With `vision_tower` (a contrastively pretrained tower, `tokenomy train-clip`'s export) it is the recipe real models
are built with instead of end-to-end training. Stage "pretrain" trains on captions with the LLM frozen, stage
"finetune" (usually `init_from` a pretrain run) trains the LLM too, on the VQA turns.
- llava, the LLaVA-1.5 recipe: the ref-clip tower is frozen in both stages (no gradient, eval mode, never in the
  optimizer) and read at its second-to-last layer; pretrain trains only the MLP projector.
- qwen, the Qwen2-VL recipe: the ViT and its merger start from the tower and train in both stages (pretrain is
  Qwen2-VL's stage 1: the vision side on image-text pairs, LLM frozen).
Such runs have no probe by default: the probe exists because the end-to-end towers, trained from scratch, collapsed
their tokens without it; a contrastively trained tower does not need it (`probe_weight` still turns it on).

Batch `step` always holds conversations step*B .. step*B+B-1 of the data stream, so a resumed run continues the exact
loss curve of an uninterrupted one, and worker processes (`workers`) that build batches ahead of the GPU build the same
batches.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tokenomy.errors import InputError
from tokenomy.train.data import IGNORE, CaptionConversations, JsonlConversations, SynthVQATrain, collate, encode
from tokenomy.train.models import ARCHES, LLM_SIZE, build, check_vision_tower, grow_llm, train_tokenizer
from tokenomy.train.probe import VisualTokenProbe, probe_grid


@dataclass
class TrainConfig:
    arch: str
    out_dir: str
    data: str | None = None  # a vqa-jsonl folder; None trains on synthvqa
    steps: int = 1000
    batch_size: int = 16  # conversations (images) per step; each carries several question/answer turns
    lr: float = 2e-3
    warmup: int = 50
    save_every: int = 25
    threads: int = 2
    seed: int = 0
    vocab_size: int = 512
    # Visual-token probe loss (synthvqa only; see tokenomy.train.probe); 0 turns it off. None: 1.0 for the end-to-end
    # models, 0 on a frozen vision tower.
    probe_weight: float | None = None
    # The first `vision_steps` of `steps` train the vision tower and projector through the probe alone (synthvqa
    # only): a step without the LLM costs about half (measured on ref-llava-e2e), and the LLM learns nothing from the image until the
    # tokens tell shapes and words apart.
    vision_steps: int = 0
    llm_layers: int = LLM_SIZE["num_hidden_layers"]
    # A run folder (or its checkpoint.pt) with fewer LLM layers to start from: its weights, probe and tokenizer are
    # taken over and the extra layers start as the identity (see models.grow_llm).
    grow_from: str | None = None
    device: str = "auto"  # "auto" takes the GPU when there is one
    # Processes that build the next batches (render, tokenise, collate) while the model trains on this one: on a GPU
    # the data, not the model, sets the pace. 0 builds them in the training process.
    workers: int = 0
    # The recipe on a pretrained tower (see the module docstring): `tokenomy train-clip`'s OUT/model (--tower clip for
    # llava, --tower qwen for qwen), and the stage, "pretrain" (captions, LLM frozen) or "finetune" (VQA turns).
    vision_tower: str | None = None
    stage: str | None = None
    # A run folder (or its checkpoint.pt) of the same architecture and sizes to start from: its weights and tokenizer
    # (fresh optimizer and schedule), e.g. the pretrain run a finetune starts from.
    init_from: str | None = None
    # The learning rate of the vision side (ViT and merger, or tower and projector) as a fraction of `lr`. None: 0.1 for
    # the Qwen2-VL recipe's pretrained ViT, 1 otherwise. At the full rate its merged tokens grew from norm 9 to 351
    # while their spread across images fell from 0.79 to 0.16, and the LLM answered from priors (2400 steps, issue 14).
    vision_lr_scale: float | None = None


STAGES = ("pretrain", "finetune")


def _check(config: TrainConfig) -> None:
    if config.arch not in ARCHES:
        raise InputError(f"unknown architecture {config.arch!r}; choose one of {', '.join(ARCHES)}")
    if config.vision_tower is None and config.stage is not None:
        raise InputError(f"--stage {config.stage} is a stage of the recipe on a frozen tower: it needs --vision-tower")
    if config.vision_tower is not None and config.stage not in STAGES:
        raise InputError(f"--vision-tower needs --stage, one of {', '.join(STAGES)}; got {config.stage!r}")
    if config.stage == "pretrain" and config.data:
        raise InputError("--stage pretrain trains on synthvqa captions; --data is for --stage finetune")
    if config.grow_from and config.init_from:
        raise InputError("--grow-from and --init-from both name a run to start from; pass one")
    if config.vision_tower is not None:
        check_vision_tower(config.arch, config.vision_tower)


def _probe_weight(config: TrainConfig) -> float:
    if config.probe_weight is not None:
        return config.probe_weight
    return 0.0 if config.vision_tower else 1.0


def _vision_lr_scale(config: TrainConfig) -> float:
    if config.vision_lr_scale is not None:
        return config.vision_lr_scale
    return 0.1 if config.vision_tower and config.arch == "qwen" else 1.0


def _param_groups(model, probe, config: TrainConfig) -> list:
    """AdamW's parameter groups: the trainable parameters at `lr`, the vision side's at `lr * vision_lr_scale`."""
    trainable = [p for p in model.parameters() if p.requires_grad] + (list(probe.parameters()) if probe is not None else [])
    scale = _vision_lr_scale(config)
    if scale == 1.0:
        return [dict(params=trainable, lr=config.lr)]
    inner = model.model
    vision_modules = [inner.visual] if hasattr(inner, "visual") else [inner.vision_tower, inner.multi_modal_projector]
    vision = {id(p) for module in vision_modules for p in module.parameters()}
    return [dict(params=[p for p in trainable if id(p) not in vision], lr=config.lr),
            dict(params=[p for p in trainable if id(p) in vision], lr=config.lr * scale)]


def _dataset(config: TrainConfig):
    if config.data:
        return JsonlConversations(config.data)
    return CaptionConversations(config.seed) if config.stage == "pretrain" else SynthVQATrain()


def _frozen_tower(model, config: TrainConfig):
    """The vision tower the LLaVA-1.5 recipe keeps frozen; None when the tower trains."""
    return model.model.vision_tower if config.vision_tower and config.arch == "llava" else None


def _freeze(model, config: TrainConfig) -> None:
    """The recipe's frozen parts: LLaVA's vision tower always, the LLM (its embeddings are the tied output head) in
    the pretrain stage."""
    tower = _frozen_tower(model, config)
    frozen = [tower] if tower is not None else []
    if config.stage == "pretrain":
        frozen += [model.model.language_model, model.lm_head]
    for module in frozen:
        module.requires_grad_(False)


def _start_from(model, state: dict, config: TrainConfig) -> None:
    """Load an --init-from run's weights; on a frozen tower they must hold the very tower --vision-tower names."""
    frozen = _frozen_tower(model, config)
    tower = {key: value.clone() for key, value in frozen.state_dict().items()} if frozen is not None else {}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise InputError(f"--init-from {config.init_from}: {str(error).splitlines()[0]} (it must be the same --arch and "
                         f"sizes)") from error
    loaded = frozen.state_dict() if frozen is not None else {}
    if any(not torch.equal(loaded[key], value) for key, value in tower.items()):
        raise InputError(f"--init-from {config.init_from} holds another vision tower than --vision-tower {config.vision_tower}")


def answer_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (labels != IGNORE), each predicted from the token before it."""
    inputs = {key: value for key, value in batch.items() if key not in ("labels", "cell_labels")}
    logits = model(**inputs).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE
    )


def encode_images(model, batch) -> None:
    """Run only the vision tower and projector (the probe's hook captures the visual tokens)."""
    grid = {"image_grid_thw": batch["image_grid_thw"]} if "image_grid_thw" in batch else {}
    model.model.get_image_features(pixel_values=batch["pixel_values"], **grid)


def _schedule(config: TrainConfig):
    def factor(step):
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _tokenizer(config: TrainConfig, dataset, out: Path):
    from transformers import PreTrainedTokenizerFast

    folder = out / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    if config.grow_from or config.init_from:
        # The run keeps the source run's embeddings, so it keeps its tokenizer too.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(_source_checkpoint(config).parent / "tokenizer", local_files_only=True)
    else:
        if config.vision_tower and not config.data:
            # Both stages' text, so the pretrain run's tokenizer also covers the finetune run that starts from it.
            texts = CaptionConversations(config.seed).texts(config.arch) + SynthVQATrain().texts(config.arch)
        else:
            texts = dataset.texts(config.arch)
        tokenizer = train_tokenizer(texts, config.arch, config.vocab_size)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _source_checkpoint(config: TrainConfig) -> Path:
    option, source = ("--grow-from", config.grow_from) if config.grow_from else ("--init-from", config.init_from)
    path = Path(source)
    path = path / "checkpoint.pt" if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"{option} {source}: no checkpoint.pt there")
    return path


class _Batches(torch.utils.data.Dataset):
    """Item `step` is batch `step` of the data stream, encoded and collated, whichever process builds it."""

    def __init__(self, config: TrainConfig, dataset, processor, grid, pad_id: int, image_token_id: int):
        self.config, self.dataset, self.processor, self.grid = config, dataset, processor, grid
        self.pad_id, self.image_token_id = pad_id, image_token_id

    def __len__(self):
        return self.config.steps

    def __getitem__(self, step: int) -> dict:
        size = self.config.batch_size
        conversations = [self.dataset[step * size + i] for i in range(size)]
        encoded = [encode(self.config.arch, self.processor, c, self.grid) for c in conversations]
        return collate(encoded, self.pad_id, self.image_token_id)


def _one_thread_per_worker(_worker_id):
    torch.set_num_threads(1)


def _device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(config.device)
    except RuntimeError as error:
        raise InputError(f"--device {config.device!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {config.device!r}: this machine has no CUDA GPU")
    return device


def _save_checkpoint(path: Path, model, probe, optimizer, scheduler, step: int, config: TrainConfig):
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                 step=step, config=asdict(config))
    if probe is not None:
        state["probe"] = probe.state_dict()
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)  # a run killed while saving keeps the previous checkpoint intact


def open_run(config, resume: bool) -> tuple:
    """(run folder, checkpoint path, log path, device) of a training run, threads set; a run that exists is continued
    only with --resume, never overwritten."""
    torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    checkpoint_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    if not resume and checkpoint_path.exists():
        raise InputError(f"{checkpoint_path} exists: pass --resume to continue it, or choose another --out")
    device = _device(config)
    out.mkdir(parents=True, exist_ok=True)
    return out, checkpoint_path, log_path, device


def resume_from(checkpoint_path: Path, device, model, optimizer, scheduler, probe=None) -> int:
    """Load a run's checkpoint into its model (and probe), optimizer and schedule; returns the step it continues at."""
    state = torch.load(checkpoint_path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    if probe is not None:
        probe.load_state_dict(state["probe"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"]


def trim_log(log_path: Path, start: int) -> None:
    """The log keeps exactly the steps the weights have seen: lines written after the last checkpoint are dropped."""
    kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] < start] if log_path.exists() else []
    log_path.write_text("".join(line + "\n" for line in kept))


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train (or resume) a reference model; returns the exported transformers folder `out_dir/model`."""
    _check(config)
    out, checkpoint_path, log_path, device = open_run(config, resume)

    dataset = _dataset(config)
    tokenizer = _tokenizer(config, dataset, out)
    model, processor = build(config.arch, tokenizer, seed=config.seed, llm_layers=config.llm_layers,
                             vision_tower=config.vision_tower)
    _freeze(model, config)
    model.to(device)
    weight = _probe_weight(config)
    # Scenes are known only for synthvqa: the probe needs them (a user's vqa-jsonl trains on answers alone).
    probe = VisualTokenProbe(model) if not config.data and weight > 0 else None
    grid = probe_grid(model) if probe is not None else None
    if probe is not None:
        probe.to(device)
    if config.vision_steps and probe is None:
        raise InputError("vision_steps needs the probe: it is for synthvqa training with probe_weight > 0")
    groups = _param_groups(model, probe, config)
    parameters = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    start = 0
    if config.grow_from and not (resume and checkpoint_path.exists()):
        shallow = torch.load(_source_checkpoint(config), map_location=device, weights_only=True)
        grow_llm(model, shallow["model"])
        if probe is not None and "probe" in shallow:
            probe.load_state_dict(shallow["probe"])
    if config.init_from and not (resume and checkpoint_path.exists()):
        source = torch.load(_source_checkpoint(config), map_location=device, weights_only=True)
        _start_from(model, source["model"], config)
        if probe is not None and "probe" in source:
            probe.load_state_dict(source["probe"])
    if resume and checkpoint_path.exists():
        start = resume_from(checkpoint_path, device, model, optimizer, scheduler, probe)
    trim_log(log_path, start)

    model.train()
    frozen_tower = _frozen_tower(model, config)
    if frozen_tower is not None:
        frozen_tower.eval()
    image_token_id = model.config.image_token_id
    began = time.time()
    batches = torch.utils.data.DataLoader(
        _Batches(config, dataset, processor, grid, tokenizer.pad_token_id, image_token_id), batch_size=None,
        sampler=range(start, config.steps), num_workers=config.workers, pin_memory=device.type == "cuda",
        worker_init_fn=_one_thread_per_worker if config.workers else None, prefetch_factor=4 if config.workers else None)
    bar = tqdm(enumerate(batches, start), initial=start, total=config.steps, desc=f"train ref-{config.arch}")
    with log_path.open("a") as log:
        for step, batch in bar:
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            if step < config.vision_steps:
                encode_images(model, batch)
                loss = torch.zeros((), device=device)
            else:
                loss = answer_loss(model, batch)
            probe_loss = probe.loss(batch["cell_labels"]) if probe is not None else torch.zeros((), device=device)
            optimizer.zero_grad(set_to_none=True)
            (loss + weight * probe_loss).backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            record = dict(step=step, loss=round(loss.item(), 5), probe_loss=round(probe_loss.item(), 5), lr=scheduler.get_last_lr()[0], seconds=round(time.time() - began, 1))
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss.item():.4f}", probe=f"{probe_loss.item():.4f}")
            if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
                _save_checkpoint(checkpoint_path, model, probe, optimizer, scheduler, step + 1, config)
    if probe is not None:
        probe.remove()
    return export(model, processor, out / "model")


def export(model, processor, folder: Path) -> Path:
    """A transformers folder (safetensors + config + processor/tokenizer files) that `tokenomy.load` opens."""
    model.eval()
    model.to("cpu")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
