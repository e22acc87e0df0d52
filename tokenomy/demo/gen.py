"""`tokenomy demo gen`: the generation playground over the shipped tiny checkpoints (tokenomy/assets/generation).

- Sample: a class-conditional image from RandAR (any order, several tokens a step) or the raster GPT, on the grid_vq
  tokenizer's 8x8 ids, with its decoding order as an animated GIF and as frames: each frame reveals the cells of the
  final image decoded so far, the step's own cells outlined.
- Inpaint: RandAR regenerates a rectangle of token cells of the last sample (or of an upload), the rest teacher-forced.
- Coarse to fine: the ordered FlexTok tokenizer encodes the image into 16 tokens; a slider decodes the first k of them
  from the same noise, so what changes with k is only how many tokens the decoder reads.
Uploads that cannot be read come back as a message and a warning.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from tokenomy.demo.serving import import_gradio
from tokenomy.errors import InputError, TokenomyError

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "generation"
SCALE = 8  # the shipped models work at 32x32 px; shown 8x larger, nearest neighbour, so every token cell stays sharp
UNDECODED_GREY = 96
STEP_OUTLINE = (255, 64, 32)
REGION_OUTLINE = (255, 220, 0)
MAX_GALLERY_FRAMES = 16
FRAME_MS = 120
GENERATORS = ("randar", "raster")

log = logging.getLogger(__name__)


@dataclass
class Decoding:
    tokens: np.ndarray  # [rows * cols] grid_vq ids, row-major
    image: np.ndarray  # uint8 [H, W, 3], the decoded 32x32 picture
    steps: list  # per decoding step, the cells (row-major indices) decoded in it


def to_pixels(images) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def to_images(pixels: np.ndarray):
    """uint8 [H, W, 3] -> [1, 3, H, W] in [-1, 1], as the tokenizers read images."""
    import torch

    return torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1


def enlarge(pixels: np.ndarray, scale: int = SCALE) -> Image.Image:
    image = Image.fromarray(pixels)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def reveal_frames(decoding: Decoding, grid: tuple, scale: int = SCALE) -> list:
    """One picture per decoding step: the cells decoded so far as in the final image, the rest grey, this step's
    cells outlined."""
    rows, cols = grid
    picture = np.asarray(enlarge(decoding.image, scale))
    cell_h, cell_w = picture.shape[0] // rows, picture.shape[1] // cols
    shown = np.zeros((rows, cols), dtype=bool)
    frames = []
    for cells in decoding.steps:
        shown.flat[cells] = True
        mask = np.repeat(np.repeat(shown, cell_h, 0), cell_w, 1)
        frame = Image.fromarray(np.where(mask[..., None], picture, np.uint8(UNDECODED_GREY)))
        draw = ImageDraw.Draw(frame)
        for cell in cells:
            row, col = divmod(int(cell), cols)
            draw.rectangle([col * cell_w, row * cell_h, (col + 1) * cell_w - 1, (row + 1) * cell_h - 1], outline=STEP_OUTLINE)
        frames.append(frame)
    return frames


def write_gif(frames: list, path: Path) -> Path:
    durations = [FRAME_MS] * (len(frames) - 1) + [FRAME_MS * 10]  # rest on the finished image before looping
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0, disposal=1)
    return path


def evenly(items: list, count: int) -> list:
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def read_upload(path, size: int) -> np.ndarray:
    """An uploaded image as uint8 [size, size, 3]: centre-cropped to a square, resized as the models were trained."""
    from tokenomy.io import load_image

    return np.asarray(ImageOps.fit(load_image(path), (size, size), Image.BICUBIC))


def outline_region(pixels: np.ndarray, region: tuple, grid: tuple, scale: int = SCALE) -> Image.Image:
    """The image with the token cells of `region` (top, left, height, width) greyed and outlined."""
    top, left, height, width = region
    rows, cols = grid
    picture = np.asarray(enlarge(pixels, scale)).copy()
    cell_h, cell_w = picture.shape[0] // rows, picture.shape[1] // cols
    y0, x0, y1, x1 = top * cell_h, left * cell_w, (top + height) * cell_h, (left + width) * cell_w
    picture[y0:y1, x0:x1] = UNDECODED_GREY
    image = Image.fromarray(picture)
    ImageDraw.Draw(image).rectangle([x0, y0, x1 - 1, y1 - 1], outline=REGION_OUTLINE, width=2)
    return image


def check_region(top, left, height, width, grid: tuple) -> tuple:
    rows, cols = grid
    top, left, height, width = (int(v) for v in (top, left, height, width))
    if height < 1 or width < 1 or top < 0 or left < 0 or top + height > rows or left + width > cols:
        raise InputError(f"the region (top {top}, left {left}, height {height}, width {width}) must lie inside the "
                         f"{rows}x{cols} token grid")
    if height * width == rows * cols:
        raise InputError("the region covers every cell: nothing would be kept to inpaint around; sample instead")
    return top, left, height, width


class Playground:
    """The shipped models, loaded on first use, and the three things the playground does with them."""

    def __init__(self, assets: Path = ASSETS):
        self.assets = Path(assets)

    @cached_property
    def grid_tokenizer(self):
        from tokenomy.tokenizers import load_tokenizer

        return load_tokenizer(self.assets / "grid_vq").eval()

    @cached_property
    def ordered_tokenizer(self):
        from tokenomy.tokenizers import load_tokenizer

        return load_tokenizer(self.assets / "flextok").eval()

    @cached_property
    def generators(self) -> dict:
        from tokenomy.generation.base import load_generator

        return {kind: load_generator(self.assets / kind).eval() for kind in GENERATORS}

    @property
    def grid(self) -> tuple:
        return self.grid_tokenizer.grid

    @property
    def image_size(self) -> int:
        return self.grid_tokenizer.config.image_size

    def class_names(self) -> list:
        from tokenomy.generation.data import shape_class_name

        return [shape_class_name(label) for label in range(self.generators["randar"].config.num_classes)]

    def _decode(self, tokens) -> np.ndarray:
        import torch

        with torch.no_grad():
            return to_pixels(self.grid_tokenizer.decode(tokens))[0]

    def sample(self, label: int, kind: str = "randar", steps: int = 0, order: str = "random", cfg: float = 2.0,
               seed: int = 0) -> Decoding:
        """One image of class `label`; `steps` (RandAR) < 64 decodes several tokens a step (cosine schedule)."""
        import torch

        if kind not in GENERATORS:
            raise InputError(f"generator must be one of {list(GENERATORS)}, got {kind!r}")
        generator = self.generators[kind]
        labels = torch.tensor([int(label)])
        rng = torch.Generator().manual_seed(int(seed))
        if kind == "raster":
            tokens = generator.generate(labels, cfg=float(cfg), generator=rng)
            steps_cells = [[cell] for cell in range(generator.num_tokens)]
        else:
            tokens, steps_cells = self._randar(labels, steps=int(steps), order=order, cfg=float(cfg), generator=rng)
        return Decoding(tokens[0].numpy(), self._decode(tokens), steps_cells)

    def _randar(self, labels, **options):
        """RandAR's tokens and, per decoding step, the cells it decoded (read from the order the sampler used)."""
        record = []
        tokens = self.generators["randar"].generate(
            labels, on_step=lambda info: record.append((info["decoded"], info["k"], info["order"])), **options)
        return tokens, [order[0, done:done + k].tolist() for done, k, order in record]

    def encode_grid(self, pixels: np.ndarray):
        return self.grid_tokenizer.encode(to_images(pixels))[0]

    def inpaint(self, tokens, region: tuple, label: int, cfg: float = 2.0, seed: int = 0) -> Decoding:
        """RandAR fills the cells of `region` (top, left, height, width), every other cell teacher-forced."""
        import torch

        top, left, height, width = check_region(*region, self.grid)
        rows, cols = self.grid
        known = torch.as_tensor(np.asarray(tokens), dtype=torch.long).reshape(rows, cols).clone()
        known[top:top + height, left:left + width] = -1
        filled, steps_cells = self._randar(torch.tensor([int(label)]), known=known.reshape(1, -1), cfg=float(cfg),
                                           generator=torch.Generator().manual_seed(int(seed)))
        return Decoding(filled[0].numpy(), self._decode(filled), steps_cells)

    def strip_lengths(self) -> list:
        """1, 2, 4, ... up to every token: the prefix lengths the coarse-to-fine strip shows side by side."""
        count = self.ordered_tokenizer.num_tokens
        return sorted({2**i for i in range(count.bit_length()) if 2**i <= count} | {count})

    def prefixes(self, pixels: np.ndarray, lengths, seed: int = 0) -> list:
        """The image decoded from the first k ordered tokens, for each k in `lengths`, all from one noise draw."""
        import torch

        tokenizer = self.ordered_tokenizer
        ids = tokenizer.encode(to_images(pixels))
        noise = torch.randn(1, *tokenizer.noise_shape, generator=torch.Generator().manual_seed(int(seed)))
        out = []
        for k in lengths:
            if not 1 <= int(k) <= tokenizer.num_tokens:
                raise InputError(f"k must be in 1..{tokenizer.num_tokens}, got {k}")
            out.append(to_pixels(tokenizer.decode(ids[:, : int(k)], noise=noise))[0])
        return out


class PlaygroundApp:
    """The event handlers of the gradio app: each returns its outputs plus a status line; a bad input becomes the
    status line and a warning."""

    def __init__(self, playground: Playground | None = None):
        self.playground = playground or Playground()
        self.workdir = Path(tempfile.mkdtemp(prefix="tokenomy-demo-gen-"))
        self._gifs = 0

    def _reported(self, run, empty: tuple):
        gr = import_gradio()
        try:
            return run()
        except TokenomyError as exc:
            problem = str(exc)
        except Exception as exc:  # the UI boundary: report in the page, keep the trace in the log
            log.exception("demo gen: a request failed")
            problem = f"the request failed: {type(exc).__name__}: {exc}"
        gr.Warning(problem)
        return (*empty, f"⚠️ {problem}")

    def _source(self, upload, last):
        """The image an edit starts from: an upload, else the last sample. Returns (pixels, grid tokens)."""
        if upload:
            pixels = read_upload(upload, self.playground.image_size)
            return pixels, self.playground.encode_grid(pixels).numpy()
        if last is None:
            raise InputError("no image yet: sample one first (Sample tab) or upload an image")
        return np.asarray(last["image"], dtype=np.uint8), np.asarray(last["tokens"])

    def sample(self, label, kind, steps, order, cfg, seed):
        def run():
            decoding = self.playground.sample(label, kind, steps, order, cfg, seed)
            frames = reveal_frames(decoding, self.playground.grid)
            self._gifs += 1
            gif = write_gif(frames, self.workdir / f"decoding-{self._gifs}.gif")
            last = {"tokens": decoding.tokens.tolist(), "image": decoding.image.tolist()}
            status = (f"{kind}: {len(decoding.tokens)} tokens in {len(decoding.steps)} steps"
                      f" ({'raster order' if kind == 'raster' else order + ' order'})")
            return enlarge(decoding.image), str(gif), evenly(frames, MAX_GALLERY_FRAMES), last, status

        return self._reported(run, (None, None, [], import_gradio().skip()))  # a failed sample keeps the last one

    def inpaint(self, upload, last, label, top, left, height, width, cfg, seed):
        def run():
            pixels, tokens = self._source(upload, last)
            region = check_region(top, left, height, width, self.playground.grid)
            decoding = self.playground.inpaint(tokens, region, label, cfg, seed)
            status = f"inpainted {region[2] * region[3]} of {len(tokens)} token cells in {len(decoding.steps)} steps"
            return outline_region(pixels, region, self.playground.grid), enlarge(decoding.image), status

        return self._reported(run, (None, None))

    def coarse_to_fine(self, upload, last, k, seed):
        def run():
            pixels, _ = self._source(upload, last)
            strip_lengths = self.playground.strip_lengths()
            lengths = [int(k)] + [n for n in strip_lengths if n != int(k)]
            decoded = dict(zip(lengths, self.playground.prefixes(pixels, lengths, seed)))
            strip = np.concatenate([decoded[n] for n in strip_lengths], axis=1)
            status = f"decoded the first {int(k)} of {self.playground.ordered_tokenizer.num_tokens} ordered tokens"
            return enlarge(pixels), enlarge(decoded[int(k)]), enlarge(strip, SCALE // 2), status

        return self._reported(run, (None, None, None))


def build_app(playground: Playground | None = None):
    """The gr.Blocks app; endpoints `/sample`, `/inpaint` and `/coarse_to_fine`."""
    gr = import_gradio()
    handlers = PlaygroundApp(playground)
    names = handlers.playground.class_names()
    rows, cols = handlers.playground.grid
    total = rows * cols
    num_ordered = handlers.playground.ordered_tokenizer.num_tokens
    with gr.Blocks(title="tokenomy: generation playground", analytics_enabled=False) as app:
        gr.Markdown("## tokenomy: generation playground\nThe shipped tiny models (32x32 px Shapes-32, 16 classes): "
                    "sample and watch the decoding order, inpaint a region, decode the ordered tokenizer coarse to fine.")
        last = gr.State(None)
        with gr.Tab("Sample"):
            with gr.Row():
                label = gr.Dropdown(names, value=names[0], type="index", label="class")
                kind = gr.Radio(list(GENERATORS), value="randar", label="generator")
                order = gr.Radio(["random", "raster"], value="random", label="order (randar)")
            with gr.Row():
                steps = gr.Slider(0, total, value=8, step=1, label="decoding steps (randar; 0 = one token a step)")
                cfg = gr.Slider(1.0, 5.0, value=2.0, step=0.25, label="classifier-free guidance")
                seed = gr.Number(value=0, precision=0, label="seed")
            go = gr.Button("Sample", variant="primary")
            sample_status = gr.Markdown()
            with gr.Row():
                sampled = gr.Image(label="sample", type="pil", interactive=False)
                gif = gr.Image(label="decoding order (animated)", type="filepath", interactive=False)
            frames = gr.Gallery(label="decoding steps", columns=8, height=340)
            go.click(handlers.sample, [label, kind, steps, order, cfg, seed], [sampled, gif, frames, last, sample_status],
                     api_name="sample")
        with gr.Tab("Inpaint"):
            gr.Markdown("Regenerates a rectangle of token cells with RandAR; every other cell is kept. "
                        "Starts from the last sample unless an image is uploaded.")
            with gr.Row():
                upload = gr.File(label="image (optional)", file_types=["image"], type="filepath")
                inpaint_label = gr.Dropdown(names, value=names[0], type="index", label="class")
            with gr.Row():
                top = gr.Slider(0, rows - 1, value=2, step=1, label="top cell")
                left = gr.Slider(0, cols - 1, value=2, step=1, label="left cell")
                height = gr.Slider(1, rows, value=4, step=1, label="height (cells)")
                width = gr.Slider(1, cols, value=4, step=1, label="width (cells)")
            with gr.Row():
                inpaint_cfg = gr.Slider(1.0, 5.0, value=2.0, step=0.25, label="classifier-free guidance")
                inpaint_seed = gr.Number(value=0, precision=0, label="seed")
            fill = gr.Button("Inpaint", variant="primary")
            inpaint_status = gr.Markdown()
            with gr.Row():
                masked = gr.Image(label="region to regenerate", type="pil", interactive=False)
                inpainted = gr.Image(label="inpainted", type="pil", interactive=False)
            fill.click(handlers.inpaint, [upload, last, inpaint_label, top, left, height, width, inpaint_cfg, inpaint_seed],
                       [masked, inpainted, inpaint_status], api_name="inpaint")
        with gr.Tab("Coarse to fine"):
            gr.Markdown(f"The ordered tokenizer (FlexTok-style, {num_ordered} tokens) reads the image; "
                        "the slider decodes its first k "
                        "tokens, from the same noise every time. Starts from the last sample unless an image is uploaded.")
            with gr.Row():
                prefix_upload = gr.File(label="image (optional)", file_types=["image"], type="filepath")
                k = gr.Slider(1, num_ordered, value=min(4, num_ordered), step=1, label="k: tokens decoded")
                prefix_seed = gr.Number(value=0, precision=0, label="noise seed")
            prefix_status = gr.Markdown()
            with gr.Row():
                original = gr.Image(label="input", type="pil", interactive=False)
                prefix = gr.Image(label="first k tokens decoded", type="pil", interactive=False)
            strip = gr.Image(label=f"k = {', '.join(map(str, handlers.playground.strip_lengths()))}", type="pil",
                             interactive=False)
            # always_last: while the slider moves, only its latest value is decoded once the previous one is done
            gr.on([k.change, prefix_upload.change], handlers.coarse_to_fine, [prefix_upload, last, k, prefix_seed],
                  [original, prefix, strip, prefix_status], api_name="coarse_to_fine", trigger_mode="always_last")
    return app
