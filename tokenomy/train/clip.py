"""ref-clip: a CLIP model trained contrastively on synthvqa scenes and captions written from their descriptions.

Real LLaVA models read a vision tower that was trained on image-caption pairs and then frozen; this is that tower for
the reference models. Read top to bottom: captions from a scene description, the model, the loss, the loop,
zero-shot retrieval, export.

Why transformers' CLIPModel and not open_clip: open_clip builds its models from named JSON configs and its own
77-token tokenizer with a 49k vocabulary, so a narrow custom tower with a small BPE means registering a new config and
a custom tokenizer; transformers' CLIPModel takes the sizes as a config object, uses any tokenizer, saves and loads a
local safetensors folder, and its `vision_model` is the very CLIPVisionTransformer that LlavaForConditionalGeneration
embeds, so the new ref-llava can take the tower's weights as they are. Its loss (`return_loss=True`) is CLIP's
symmetric cross-entropy over the image-caption similarity matrix with a learned temperature, what open_clip's ClipLoss
computes on one process. `caption_weight` adds CoCa's captioning loss (open_clip's CoCa recipe) through a small decoder
that is dropped at export; `twins` puts hard negatives in every batch.

`tower="qwen"` trains a Qwen2-VL ViT (no CLS, 2x2 patch merger) in CLIP's place, for the Qwen2-VL recipe: its image
embedding is the mean of the merged tokens, the very tokens a Qwen2-VL LLM reads, projected like CLIP's; the export
is that ViT alone (a transformers `Qwen2VisionTransformerPretrainedModel` folder), which `tokenomy train-ref --arch
qwen --vision-tower` starts from.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tokenomy.errors import InputError
from tokenomy.eval import synthvqa
from tokenomy.train.loop import _one_thread_per_worker, _schedule, open_run, resume_from, trim_log
from tokenomy.train.models import IMAGE_SIZE, LLM_SIZE, PATCH_SIZE, train_tokenizer

CAPTION_SEED = 17  # captions of train scene i are drawn from rng([CAPTION_SEED, seed, i])
TWIN_SEED = 23
MAX_CAPTION_TOKENS = 48
COLUMNS = ("left", "centre", "right")
ROWS = ("top", "middle", "bottom")


@dataclass
class ClipConfig:
    out_dir: str
    steps: int = 3000
    batch_size: int = 64  # scenes per step, one caption each; the other 63 captions are each image's negatives
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    vision_layers: int = 12
    width: int = 64  # both towers; 4 heads of 16
    text_layers: int = 4
    save_every: int = 50
    threads: int = 1
    seed: int = 0
    vocab_size: int = 512
    tokenizer_scenes: int = 500  # train scenes whose captions the BPE is trained on
    device: str = "auto"
    # Processes rendering and preprocessing the next batches: a 64-scene batch takes about 0.3 s of one core here, more
    # than a step of this model on a GPU. 0 builds them in the training process.
    workers: int = 0
    tower: str = "clip"  # one of TOWERS: CLIP's ViT with CLS, or Qwen2-VL's ViT with its merger
    captions: str = "v2"  # one of CAPTION_STYLES (see scene_facts); the shipped ref-clip was trained on v1
    # Half of each batch are twins of the other half that differ in one fact, the word or one named object's shape, and
    # are captioned alike: random batches are told apart by colours and positions alone, so v1 and v2 never learnt to
    # read the word (benchmarks/RESULTS.md, issue 14). See `twin`.
    twins: bool = False
    # CoCa's recipe (open_clip's CoCa: contrastive + 2 x captioning): a small decoder writes each caption from all of
    # the tower's last-layer tokens, so every fact a caption names must be in the tokens. 0 trains CLIP's loss alone.
    # Even with --twins, the contrastive loss alone left both towers unable to tell twins apart (issue 14).
    caption_weight: float = 0.0
    decoder_layers: int = 2


TOWERS = ("clip", "qwen")
CAPTION_STYLES = ("v1", "v2")


# ---- captions ------------------------------------------------------------------------------------------------------
def where(o) -> str:
    """The ninth of the canvas an object's centre lies in, in words."""
    third = IMAGE_SIZE / 3
    return f"{ROWS[min(int(o.y // third), 2)]} {COLUMNS[min(int(o.x // third), 2)]}".replace("middle centre", "centre")


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else f"{shape}s"


def a(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def object_phrase(o, rng) -> str:
    size = "small " if o.small and rng.random() < 0.7 else ""
    forms = [a(f"{size}{o.color} {o.shape}"), f"{size}{o.color} {o.shape}", a(f"{size}{o.shape} in {o.color}"),
             a(f"{size}{o.color} {o.shape} at the {where(o)}"), a(f"{size}{o.color} {o.shape} in the {where(o)}")]
    return forms[int(rng.integers(len(forms)))]


def scene_facts(scene, rng, style: str = "v2") -> list[str]:
    """Phrases true of the scene: some objects, then maybe a count, the word, the small object and a relation.

    Style v1 (the shipped ref-clip) names 1-3 objects and the word in half of the captions, one form of four in capitals;
    its patch tokens ended up holding no trace of the word and little of the shape (benchmarks/RESULTS.md, issue 14).
    v2 names 2-4 objects and the word in every caption, in lower case as the questions write it."""
    if style not in CAPTION_STYLES:
        raise InputError(f"caption style {style!r}: choose one of {', '.join(CAPTION_STYLES)}")
    objects = list(scene.objects)
    rng.shuffle(objects)
    named = int(rng.integers(1, 4)) if style == "v1" else int(rng.integers(2, 5))
    facts = [object_phrase(o, rng) for o in objects[:named]]
    count = len(scene.objects)
    if rng.random() < 0.5:
        kind = int(rng.integers(3))
        if kind == 0:
            facts.append(f"{count} {('objects', 'shapes', 'things')[int(rng.integers(3))]}")
        elif kind == 1:
            color = objects[0].color
            same = sum(o.color == color for o in scene.objects)
            facts.append(f"{same} {color} {'object' if same == 1 else 'objects'}")
        else:
            shape = objects[0].shape
            same = sum(o.shape == shape for o in scene.objects)
            facts.append(f"{same} {_plural(shape, same)}")
    if style == "v1" and rng.random() < 0.5:
        forms = [f"the word {scene.word}", f"the text {scene.word.upper()}", f"{scene.word} written on it",
                 f'the word "{scene.word}"']
        facts.append(forms[int(rng.integers(len(forms)))])
    elif style == "v2":
        forms = [f"the word {scene.word}", f"{scene.word} written on it", f'the word "{scene.word}"']
        facts.append(forms[int(rng.integers(len(forms)))])
    if rng.random() < 0.3:
        small = next(o for o in scene.objects if o.small)
        facts.append(f"a tiny {small.color} {small.shape}")
    large = [o for o in scene.objects if not o.small]
    if len(large) >= 2 and rng.random() < 0.3:
        first, second = (large[i] for i in rng.choice(len(large), 2, replace=False))
        if abs(first.x - second.x) >= synthvqa.SPATIAL_MARGIN:
            facts.append(f"{a(first.name)} {'left' if first.x < second.x else 'right'} of {a(second.name)}")
        elif abs(first.y - second.y) >= synthvqa.SPATIAL_MARGIN:
            facts.append(f"{a(first.name)} {'above' if first.y < second.y else 'below'} {a(second.name)}")
    return facts


def caption(scene, rng, style: str = "v2") -> str:
    facts = scene_facts(scene, rng, style)
    rng.shuffle(facts)
    joined = ", ".join(facts[:-1]) + (" and " if len(facts) > 1 else "") + facts[-1]
    prefix = ("", "a picture of ", "an image with ", "a drawing of ")[int(rng.integers(4))]
    return prefix + joined


def full_caption(scene) -> str:
    """The fixed, complete caption retrieval is scored against: every object left to right, the count, the word."""
    objects = sorted(scene.objects, key=lambda o: o.x)
    parts = [a(f"{'small ' if o.small else ''}{o.color} {o.shape} at the {where(o)}") for o in objects]
    return f"{len(objects)} objects: " + ", ".join(parts) + f" and the word {scene.word}"


def twin(scene, index: int, caption_seed: list):
    """`scene` with one fact changed, a hard negative for it: the word (even `index`), or else the shape of the object
    that every caption drawn from `caption_seed` names first (odd `index`, when that object is large: a 3-pixel shape
    is hardly a shape). Captioned from the same seed, the two captions then differ in exactly that fact."""
    rng = np.random.default_rng([TWIN_SEED, index])
    # caption() first shuffles the objects, so the same seed puts the same object first whatever the twin changes.
    order = list(range(len(scene.objects)))
    np.random.default_rng(caption_seed).shuffle(order)
    first = scene.objects[order[0]]
    if index % 2 and not first.small:
        shape = str(rng.choice([s for s in synthvqa.SHAPES if s != first.shape]))
        objects = [replace(o, shape=shape) if o is first else o for o in scene.objects]
        return replace(scene, objects=objects, questions=[])
    word = str(rng.choice([w for w in synthvqa.WORDS if w != scene.word]))
    # The same place: only the glyphs differ.
    return replace(scene, word=word, text_box=synthvqa.word_box(word, *scene.text_box[:2]), questions=[])


def train_pair(index: int, seed: int, style: str = "v2", twinned: bool = False) -> tuple:
    """(image, caption) of train scene `index`, or of its `twin`: the same whichever process or resume builds it."""
    scene = synthvqa.make_scene("train", index)
    caption_seed = [CAPTION_SEED, seed, index]
    if twinned:
        scene = twin(scene, index, caption_seed)
    return synthvqa.render(scene), caption(scene, np.random.default_rng(caption_seed), style)


# ---- the model -----------------------------------------------------------------------------------------------------
class QwenTowerClip(torch.nn.Module):
    """CLIP's two towers and loss with a Qwen2-VL ViT as the image tower. It has no CLS token, so the image embedding
    is the mean of its merged tokens (what the LLM reads), projected like CLIP's; the text side is CLIP's."""

    def __init__(self, vision_config, text_config, projection_dim: int):
        from transformers import CLIPTextModel
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        super().__init__()
        self.visual = Qwen2VisionTransformerPretrainedModel(vision_config)
        self.text_model = CLIPTextModel(text_config)
        self.visual_projection = torch.nn.Linear(vision_config.hidden_size, projection_dim, bias=False)
        self.text_projection = torch.nn.Linear(text_config.hidden_size, projection_dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def get_image_features(self, pixel_values, image_grid_thw):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        merged = self.visual(pixel_values, grid_thw=image_grid_thw).pooler_output
        per_image = (image_grid_thw.prod(-1) // self.visual.spatial_merge_size**2).tolist()
        pooled = torch.stack([tokens.mean(0) for tokens in merged.split(per_image)])
        return BaseModelOutputWithPooling(pooler_output=self.visual_projection(pooled))

    def get_text_features(self, input_ids, attention_mask):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        text = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return BaseModelOutputWithPooling(pooler_output=self.text_projection(text))

    def forward(self, pixel_values, image_grid_thw, input_ids, attention_mask, return_loss: bool = True):
        from transformers.models.clip.modeling_clip import CLIPOutput, image_text_contrastive_loss

        normalize = torch.nn.functional.normalize
        images = normalize(self.get_image_features(pixel_values, image_grid_thw).pooler_output, dim=-1)
        texts = normalize(self.get_text_features(input_ids, attention_mask).pooler_output, dim=-1)
        logits_per_text = self.logit_scale.exp() * texts @ images.T
        return CLIPOutput(loss=image_text_contrastive_loss(logits_per_text) if return_loss else None,
                          logits_per_text=logits_per_text, logits_per_image=logits_per_text.T)


class CaptioningClip(torch.nn.Module):
    """CLIPModel plus CoCa's captioning decoder: a small Llama reads the tower's last-layer tokens (CLS and patches,
    linearly mapped) as a prefix and is trained to write the caption after them; the loss is CLIP's plus
    `caption_weight` times the caption tokens' cross-entropy. Only `clip` is exported: the decoder is a training aid."""

    def __init__(self, clip_model, vocab_size: int, config: ClipConfig):
        from transformers import LlamaConfig, LlamaForCausalLM

        super().__init__()
        self.clip = clip_model
        width = clip_model.config.vision_config.hidden_size
        self.to_decoder = torch.nn.Linear(width, config.width)
        self.decoder = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=config.width, intermediate_size=2 * config.width,
            num_hidden_layers=config.decoder_layers, num_attention_heads=max(1, config.width // 16),
            max_position_embeddings=(IMAGE_SIZE // PATCH_SIZE) ** 2 + 1 + MAX_CAPTION_TOKENS))
        self.caption_weight = config.caption_weight

    def get_image_features(self, pixel_values):
        return self.clip.get_image_features(pixel_values=pixel_values)

    def get_text_features(self, input_ids, attention_mask):
        return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)

    def caption_loss(self, image_tokens, input_ids, attention_mask):
        """Cross-entropy of the caption tokens, written after the tower's last-layer tokens as a prefix."""
        prefix = self.to_decoder(image_tokens)
        embeds = torch.cat([prefix, self.decoder.get_input_embeddings()(input_ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        labels = torch.cat([input_ids.new_full(prefix.shape[:2], -100), input_ids.masked_fill(attention_mask == 0, -100)], dim=1)
        return self.decoder(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    def forward(self, pixel_values, input_ids, attention_mask, return_loss: bool = True):
        from transformers.models.clip.modeling_clip import CLIPOutput, image_text_contrastive_loss

        normalize = torch.nn.functional.normalize
        vision = self.clip.vision_model(pixel_values=pixel_values)  # once, for both losses
        images = normalize(self.clip.visual_projection(vision.pooler_output), dim=-1)
        texts = normalize(self.get_text_features(input_ids, attention_mask).pooler_output, dim=-1)
        logits_per_text = self.clip.logit_scale.exp() * texts @ images.T
        contrastive = image_text_contrastive_loss(logits_per_text)
        captioning = self.caption_loss(vision.last_hidden_state, input_ids, attention_mask)
        output = CLIPOutput(loss=contrastive + self.caption_weight * captioning, logits_per_text=logits_per_text,
                            logits_per_image=logits_per_text.T)
        self.last_losses = dict(contrastive=contrastive.item(), captioning=captioning.item())  # for the training log
        return output


def exported(model):
    """What a run exports: the Qwen2-VL ViT alone, the CLIPModel without CoCa's decoder, or the CLIPModel."""
    if isinstance(model, QwenTowerClip):
        return model.visual
    return model.clip if isinstance(model, CaptioningClip) else model


def build_clip(tokenizer, config: ClipConfig):
    """transformers' CLIPModel: a ViT with CLS on 128 px in 8 px patches, a small text transformer, 64-d embeddings;
    with `tower="qwen"`, a QwenTowerClip whose ViT is sized like ref-qwen's (merged tokens as wide as its LLM)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTextConfig, Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    heads = max(1, config.width // 16)
    text = dict(vocab_size=len(tokenizer), hidden_size=config.width, intermediate_size=2 * config.width,
                num_hidden_layers=config.text_layers, num_attention_heads=heads, max_position_embeddings=MAX_CAPTION_TOKENS,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)  # the text embedding is read at the first end token
    torch.manual_seed(config.seed)
    if config.tower == "qwen":
        vision = Qwen2VLVisionConfig(depth=config.vision_layers, embed_dim=config.width, hidden_size=LLM_SIZE["hidden_size"],
                                     num_heads=heads, mlp_ratio=2, patch_size=PATCH_SIZE, spatial_merge_size=2,
                                     temporal_patch_size=2, in_chans=3)
        model = QwenTowerClip(vision, CLIPTextConfig(**text), config.width)
        size = {"shortest_edge": IMAGE_SIZE * IMAGE_SIZE, "longest_edge": IMAGE_SIZE * IMAGE_SIZE}
        return model, Qwen2VLImageProcessorPil(size=size, patch_size=PATCH_SIZE, merge_size=2, temporal_patch_size=2)
    vision = dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=config.width, intermediate_size=2 * config.width,
                  num_hidden_layers=config.vision_layers, num_attention_heads=heads)
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=config.width))
    if config.caption_weight:
        model = CaptioningClip(model, len(tokenizer), config)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return model, image_processor


def encode_images(image_processor, images: list) -> dict:
    """pixel_values, and image_grid_thw for the Qwen2-VL tower."""
    encoded = image_processor(images, return_tensors="pt")
    return {key: encoded[key] for key in ("pixel_values", "image_grid_thw") if key in encoded}


def caption_tokenizer(config: ClipConfig, out: Path):
    """A byte-level BPE trained on captions of the first train scenes (kept in the run folder for resumes)."""
    from transformers import PreTrainedTokenizerFast

    folder = out / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    else:
        scenes = [synthvqa.make_scene("train", i) for i in range(config.tokenizer_scenes)]
        texts = [caption(s, np.random.default_rng([CAPTION_SEED, config.seed, i]), config.captions) for i, s in enumerate(scenes)]
        texts += [full_caption(s) for s in scenes]
        # "<|im_end|>" ends a caption: CLIP's text model treats an end token of id 2 ("</s>" here) as a legacy
        # config and reads the highest token id instead.
        tokenizer = train_tokenizer(texts, "qwen", config.vocab_size)
        tokenizer.chat_template = None
        tokenizer.save_pretrained(folder)
    tokenizer.padding_side = "right"  # CLIP reads each caption at its end token; right padding keeps that position simple
    return tokenizer


def encode_captions(tokenizer, texts: list) -> dict:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][: MAX_CAPTION_TOKENS - 1] + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, sequence in enumerate(ids):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return dict(input_ids=input_ids, attention_mask=mask)


def batch(step: int, config: ClipConfig, tokenizer, image_processor) -> dict:
    """Batch `step` holds train scenes step*B .. step*B+B-1 (the first B/2 and their twins with --twins), so a resumed
    run continues the same loss curve."""
    first = step * config.batch_size
    if config.twins:
        pairs = [train_pair(first + i, config.seed, config.captions, twinned)
                 for i in range(config.batch_size // 2) for twinned in (False, True)]
    else:
        pairs = [train_pair(first + i, config.seed, config.captions) for i in range(config.batch_size)]
    return dict(**encode_images(image_processor, [image for image, _ in pairs]), **encode_captions(tokenizer, [text for _, text in pairs]))


class Batches(torch.utils.data.Dataset):
    """Item `step` is `batch(step, ...)`, whichever process builds it."""

    def __init__(self, config: ClipConfig, tokenizer, image_processor):
        self.config, self.tokenizer, self.image_processor = config, tokenizer, image_processor

    def __len__(self):
        return self.config.steps

    def __getitem__(self, step: int) -> dict:
        return batch(step, self.config, self.tokenizer, self.image_processor)


# ---- zero-shot retrieval -------------------------------------------------------------------------------------------
@torch.no_grad()
def retrieval(model, tokenizer, image_processor, scenes: int = 100, split: str = "test") -> dict:
    """Image -> caption and caption -> image top-1 accuracy (%) among `scenes` test scenes and their full captions;
    chance is 100 / scenes."""
    model.eval()
    described = [synthvqa.make_scene(split, i) for i in range(scenes)]
    device = next(model.parameters()).device
    pixels = {k: v.to(device) for k, v in encode_images(image_processor, [synthvqa.render(s) for s in described]).items()}
    texts = {k: v.to(device) for k, v in encode_captions(tokenizer, [full_caption(s) for s in described]).items()}
    images = torch.nn.functional.normalize(model.get_image_features(**pixels).pooler_output, dim=-1)
    captions = torch.nn.functional.normalize(model.get_text_features(**texts).pooler_output, dim=-1)
    similarity = images @ captions.T
    target = torch.arange(scenes, device=device)
    return dict(image_to_caption=100 * (similarity.argmax(1) == target).float().mean().item(),
                caption_to_image=100 * (similarity.argmax(0) == target).float().mean().item(),
                chance=100 / scenes, scenes=scenes)


# ---- the loop ------------------------------------------------------------------------------------------------------
def train_clip(config: ClipConfig, resume: bool = False, eval_scenes: int = 100) -> Path:
    """Train (or resume) ref-clip; returns the exported folder `out_dir/model` (CLIPModel, tokenizer, image processor)."""
    if config.tower not in TOWERS:
        raise InputError(f"--tower {config.tower!r}: choose one of {', '.join(TOWERS)}")
    if config.caption_weight and config.tower != "clip":
        raise InputError("--caption-weight trains CoCa's decoder on CLIP's tower: it needs --tower clip")
    if config.captions not in CAPTION_STYLES:
        raise InputError(f"--captions {config.captions!r}: choose one of {', '.join(CAPTION_STYLES)}")
    if config.twins and config.batch_size % 2:
        raise InputError(f"--twins pairs each scene with its twin: --batch-size must be even, got {config.batch_size}")
    if config.vision_layers < 1 or config.width % 16:
        raise InputError(f"--vision-layers must be >= 1 and --width a multiple of 16, got {config.vision_layers}, {config.width}")
    out, checkpoint_path, log_path, device = open_run(config, resume)
    tokenizer = caption_tokenizer(config, out)
    model, image_processor = build_clip(tokenizer, config)
    model.to(device)
    # CLIP's recipe: no weight decay on gains, biases and the temperature.
    decayed = [p for n, p in model.named_parameters() if p.dim() >= 2 and "logit_scale" not in n]
    others = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "logit_scale" not in n)]
    optimizer = torch.optim.AdamW([dict(params=decayed, weight_decay=config.weight_decay), dict(params=others, weight_decay=0.0)],
                                  lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    start = 0
    if resume and checkpoint_path.exists():
        start = resume_from(checkpoint_path, device, model, optimizer, scheduler)
    trim_log(log_path, start)

    model.train()
    temperature = (model.clip if isinstance(model, CaptioningClip) else model).logit_scale  # log of it, learned
    began = time.time()
    batches = torch.utils.data.DataLoader(
        Batches(config, tokenizer, image_processor), batch_size=None, sampler=range(start, config.steps),
        num_workers=config.workers, pin_memory=device.type == "cuda",
        worker_init_fn=_one_thread_per_worker if config.workers else None, prefetch_factor=4 if config.workers else None)
    with log_path.open("a") as log:
        for step, built in tqdm(enumerate(batches, start), initial=start, total=config.steps, desc="train ref-clip"):
            inputs = {k: v.to(device, non_blocking=True) for k, v in built.items()}
            loss = model(**inputs, return_loss=True).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # CLIP clamps the learned temperature at 100
                temperature.clamp_(0, math.log(100))
            losses = {k: round(v, 5) for k, v in getattr(model, "last_losses", {}).items()}
            log.write(json.dumps(dict(step=step, loss=round(loss.item(), 5), **losses, lr=scheduler.get_last_lr()[0],
                                      temperature=round(temperature.exp().item(), 3),
                                      seconds=round(time.time() - began, 2))) + "\n")
            log.flush()
            if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
                state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                             step=step + 1, config=asdict(config))
                torch.save(state, checkpoint_path.with_suffix(".tmp"))
                checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)  # a kill while saving keeps the last one
    folder = out / "model"
    model.eval().to("cpu")
    # The Qwen2-VL tower is exported alone (the LLM reads the ViT) and CoCa's decoder not at all; checkpoint.pt keeps both.
    exported(model).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    if eval_scenes:
        scores = retrieval(model, tokenizer, image_processor, eval_scenes)
        (folder / "retrieval.json").write_text(json.dumps(scores, indent=1) + "\n")
    return folder
