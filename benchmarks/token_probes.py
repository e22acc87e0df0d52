"""Where does a model keep what? A linear probe per visual token, on the frozen tokens entering the LLM.

For each model, the tokens the projector (LLaVA) or the patch merger (Qwen2-VL) hands to the LLM are captured on
synthvqa scenes; one linear classifier per head reads ONE token and predicts:
  color, shape, word  what lies under that token's cell (tokenomy.train.probe.cell_labels; 0 = nothing there)
  count               how many objects the whole scene holds (a scene-level fact, the same label on every cell)
  scene_word          which word is written somewhere in the scene (scene-level too)
The probe is shared by all positions, fit on train-split scenes and scored on held-out test-split scenes, separately
on labelled cells (something of that head under the cell; for the scene-level heads: cells with an object or text)
and on background cells. A scene-level fact readable from background cells means the model stores it there, so a
reducer that keeps only the objects' tokens can lose it. Chance is the majority class of each group on the test cells.

    python benchmarks/token_probes.py --models ref-llava-e2e,ref-qwen-e2e --train-scenes 300 --test-scenes 100

prints a markdown table and writes benchmarks/token_probes.json. `--encoders ref-clip` probes a vision encoder
(`tokenomy.vision.load`) on its patch tokens at `--feature-layer` (-2, CLS dropped: what a LLaVA projector reads). A
LLaVA projector is an MLP applied to each token alone, so it cannot move a fact from one token to another: where the
frozen tower keeps a fact is where every LLaVA built on it finds it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

import torch

import tokenomy
from tokenomy.eval import synthvqa
from tokenomy.train.probe import HEADS, cell_labels, probe_grid

CELL_HEADS = ("color", "shape", "word")
SCENE_HEADS = {"count": 7, "scene_word": len(synthvqa.WORDS)}
PROMPT = "What word is written?"  # the tokens entering the LLM do not depend on it: the projector never sees the text


def projector_of(model):
    return model.model.visual.merger if hasattr(model.model, "visual") else model.model.multi_modal_projector


@torch.no_grad()
def visual_tokens(pipeline, images, batch_size: int) -> torch.Tensor:
    """[images, cells, D] fp32 tokens entering the LLM (no reducer), captured at the projector's output."""
    captured = []
    handle = projector_of(pipeline.model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pipeline.forward(chunk, [PROMPT] * len(chunk))
    finally:
        handle.remove()
    flat = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).float()
    return flat.reshape(len(images), -1, flat.shape[-1])


@torch.no_grad()
def encoder_tokens(encoder, images, batch_size: int, feature_layer: int) -> torch.Tensor:
    """[images, patches, D] fp32 patch tokens of a vision encoder's `feature_layer` (CLS dropped)."""
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = encoder.image_processor(images[start : start + batch_size], return_tensors="pt")["pixel_values"]
        chunks.append(encoder.encode(pixels, feature_layer=feature_layer).tokens.float())
    return torch.cat(chunks)


def scene_labels(split: str, count: int, grid: int):
    """(images, labels [scenes, cells, heads], foreground [scenes, cells] bool) in the column order of `heads()`."""
    images, labels, foreground = [], [], []
    for index in range(count):
        scene = synthvqa.make_scene(split, index)
        image = synthvqa.render(scene)
        cells = cell_labels(scene, image, grid)
        columns = [cells[:, list(HEADS).index(name)] for name in CELL_HEADS]
        columns += [torch.full_like(cells[:, 0], len(scene.objects)), torch.full_like(cells[:, 0], synthvqa.WORDS.index(scene.word))]
        images.append(image)
        labels.append(torch.stack(columns, dim=-1))
        foreground.append((cells[:, list(HEADS).index("color")] > 0) | (cells[:, list(HEADS).index("word")] > 0))
    return images, torch.stack(labels), torch.stack(foreground)


def heads() -> dict:
    return {**{name: HEADS[name] for name in CELL_HEADS}, **SCENE_HEADS}


def labelled_mask(name: str, labels: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    return labels > 0 if name in CELL_HEADS else foreground


def fit_probe(x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor, classes: int, steps: int, decay: float):
    """Multinomial logistic regression by L-BFGS; labelled and background cells weigh half each (the background
    outnumbers objects about 4 to 1, and a probe fit to the plain mean would ignore the objects)."""
    weight = torch.where(labelled, 0.5 / labelled.sum().clamp(min=1), 0.5 / (~labelled).sum().clamp(min=1))
    linear = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (torch.nn.functional.cross_entropy(linear(x), y, reduction="none") * weight).sum()
        loss = loss + decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return linear


def group_accuracy(predicted, y, group) -> dict:
    if not group.any():
        return dict(accuracy=None, chance=None, cells=0)
    right = (predicted[group] == y[group]).float().mean().item()
    chance = torch.bincount(y[group]).max().item() / int(group.sum())
    return dict(accuracy=100 * right, chance=100 * chance, cells=int(group.sum()))


def probe_model(name: str, train_scenes: int, test_scenes: int, batch_size: int, steps: int, decay: float,
                encoder: bool = False, feature_layer: int = -2) -> dict:
    start = time.perf_counter()
    if encoder:
        tower = tokenomy.vision.load(name)
        grid = tower.image_processor.crop_size["height"] // tower.patch_size
        read = lambda images: encoder_tokens(tower, images, batch_size, feature_layer)  # noqa: E731
    else:
        pipeline = tokenomy.load(name)
        grid = probe_grid(pipeline.model)
        read = lambda images: visual_tokens(pipeline, images, batch_size)  # noqa: E731
    data = {}
    for split, count in (("train", train_scenes), ("test", test_scenes)):
        images, labels, foreground = scene_labels(split, count, grid)
        tokens = read(images)
        if tokens.shape[1] != grid * grid:
            raise SystemExit(f"{name}: {tokens.shape[1]} visual tokens per image, expected a {grid}x{grid} grid")
        data[split] = (tokens.flatten(0, 1), labels.flatten(0, 1), foreground.flatten())
    train_x, train_y, train_fg = data["train"]
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)  # standardised, so one decay suits every model
    test_x, test_y, test_fg = data["test"]
    out = dict(grid=grid, dim=train_x.shape[1], heads={})
    for column, (head, classes) in enumerate(heads().items()):
        labelled = labelled_mask(head, train_y[:, column], train_fg)
        probe = fit_probe((train_x - mean) / std, train_y[:, column], labelled, classes, steps, decay)
        with torch.no_grad():
            predicted = probe((test_x - mean) / std).argmax(-1)
        held_out = labelled_mask(head, test_y[:, column], test_fg)
        out["heads"][head] = dict(labelled=group_accuracy(predicted, test_y[:, column], held_out),
                                  background=group_accuracy(predicted, test_y[:, column], ~held_out))
    out["seconds"] = time.perf_counter() - start
    return out


def pooled_probes(name: str, train_scenes: int, test_scenes: int, batch_size: int, steps: int, decay: float) -> dict:
    """For a vision encoder with CLS: is a fact there at all, if no single token holds it? Probes on the mean layer -2
    token of each object's cells (shape), of the text cells (word), and on the CLS token at layers -2 and -1 (the
    scene's word and object count). One row per (fact, input), accuracy on held-out test scenes."""
    tower = tokenomy.vision.load(name)
    grid = tower.image_processor.crop_size["height"] // tower.patch_size
    columns = list(HEADS)

    @torch.no_grad()
    def features(split: str, count: int) -> dict:
        scenes = [synthvqa.make_scene(split, i) for i in range(count)]
        images = [synthvqa.render(scene) for scene in scenes]
        patches, cls = [], {-2: [], -1: []}
        for start in range(0, count, batch_size):
            pixels = tower.image_processor(images[start : start + batch_size], return_tensors="pt")["pixel_values"]
            hidden = tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states
            patches.append(hidden[-2][:, 1:].float())
            for layer in cls:
                cls[layer].append(hidden[layer][:, 0].float())
        patches = torch.cat(patches)
        rows = {"shape": ([], []), "word": ([], [])}
        for index, (scene, image) in enumerate(zip(scenes, images)):
            cells = cell_labels(scene, image, grid)
            color, shape, word = (cells[:, columns.index(head)] for head in ("color", "shape", "word"))
            for key in sorted(set(zip(color.tolist(), shape.tolist()))):  # (colour, shape) names one object
                if 0 not in key:
                    rows["shape"][0].append(patches[index][(color == key[0]) & (shape == key[1])].mean(0))
                    rows["shape"][1].append(key[1])
            if (word > 0).any():
                rows["word"][0].append(patches[index][word > 0].mean(0))
                rows["word"][1].append(synthvqa.WORDS.index(scene.word))
        words = torch.tensor([synthvqa.WORDS.index(scene.word) for scene in scenes])
        counts = torch.tensor([len(scene.objects) for scene in scenes])
        data = {f"{fact} from the mean token of its cells": (torch.stack(x), torch.tensor(y)) for fact, (x, y) in rows.items()}
        for layer, chunks in cls.items():
            data[f"word from CLS at layer {layer}"] = (torch.cat(chunks), words)
            data[f"count from CLS at layer {layer}"] = (torch.cat(chunks), counts)
        return data

    train, test = features("train", train_scenes), features("test", test_scenes)
    out = {}
    for row, (x, y) in train.items():
        classes = {"shape": HEADS["shape"], "word": len(synthvqa.WORDS), "count": SCENE_HEADS["count"]}[row.split()[0]]
        mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
        probe = fit_probe((x - mean) / std, y, torch.ones_like(y, dtype=torch.bool), classes, steps, decay)
        test_x, test_y = test[row]
        with torch.no_grad():
            predicted = probe((test_x - mean) / std).argmax(-1)
        out[row] = group_accuracy(predicted, test_y, torch.ones_like(test_y, dtype=torch.bool))
    return out


def table(results: dict) -> str:
    models = list(results)
    lines = ["| head | " + " | ".join(f"{m} labelled | {m} background" for m in models) + " |",
             "|---|" + "---|---|" * len(models)]
    for head in heads():
        cells = []
        for model in models:
            for group in ("labelled", "background"):
                row = results[model]["heads"][head][group]
                cells.append("-" if row["accuracy"] is None else f"{row['accuracy']:.1f} (chance {row['chance']:.1f})")
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} logical CPUs (the models run on the CPU)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ref-llava-e2e,ref-qwen-e2e", help="VLMs (tokenomy.load names); '' for none")
    parser.add_argument("--encoders", default="", help="vision encoders (tokenomy.vision.load names), e.g. ref-clip")
    parser.add_argument("--feature-layer", type=int, default=-2, help="the encoders' layer that is probed")
    parser.add_argument("--train-scenes", type=int, default=300)
    parser.add_argument("--test-scenes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--steps", type=int, default=200, help="L-BFGS iterations per head")
    parser.add_argument("--decay", type=float, default=1e-3, help="L2 penalty on the probe weights")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    common = (args.train_scenes, args.test_scenes, args.batch_size, args.steps, args.decay)
    results = {name: probe_model(name, *common) for name in filter(None, args.models.split(","))}
    results.update({f"{name} (layer {args.feature_layer})": probe_model(name, *common, encoder=True, feature_layer=args.feature_layer)
                    for name in filter(None, args.encoders.split(","))})
    if not results:
        raise SystemExit("nothing to probe: pass --models and/or --encoders")
    print(table(results))
    pooled = {name: pooled_probes(name, *common) for name in filter(None, args.encoders.split(","))}
    for name, rows in pooled.items():
        print(f"\n| {name}: pooled and CLS probes | accuracy (chance) | test items |\n|---|---|---|")
        for row, score in rows.items():
            print(f"| {row} | {score['accuracy']:.1f} ({score['chance']:.1f}) | {score['cells']} |")
    meta = dict(command="python benchmarks/token_probes.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), machine=machine(),
                torch=torch.__version__, threads=args.threads)
    Path(args.out).write_text(json.dumps(dict(meta=meta, results=results, pooled=pooled), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
