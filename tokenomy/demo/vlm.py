"""`tokenomy demo vlm`: chat about an image or a video with a token reducer, and see what it kept.

Each reply shows the answer, the visual tokens kept / in, the prefill time and tokenomy.vis's picture of the kept
tokens; side-by-side mode also answers without reduction. Anything wrong with the input (an unreadable or oversized
upload, a bad reducer spec, a model folder that does not load) comes back as a message in the chat and a warning,
never as a stack trace.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

from tokenomy.demo.serving import import_gradio
from tokenomy.errors import InputError, TokenomyError

DEFAULT_MODEL = "ref-llava-e2e"
DEFAULT_REDUCER = "vtc-cls"
DEFAULT_KEEP = 64
DEFAULT_MAX_NEW_TOKENS = 16
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
# Bounds on what the demo holds in memory: every typed model path or spec would otherwise stay loaded.
MAX_MODELS = 2
MAX_PIPELINES = 16
FULL = "none"

log = logging.getLogger(__name__)


class PipelineCache:
    """Pipelines per (model, reducer spec, keep), sharing one loaded model per name; least recently used go first."""

    def __init__(self, max_models: int = MAX_MODELS, max_pipelines: int = MAX_PIPELINES):
        self.max_models, self.max_pipelines = max_models, max_pipelines
        self.models: OrderedDict = OrderedDict()
        self.pipelines: OrderedDict = OrderedDict()

    def get(self, model: str, reducer: str, keep):
        from tokenomy.reducers.plan import build_plan
        from tokenomy.vlm.pipeline import Pipeline

        key = (model, reducer, keep)
        if key in self.pipelines:
            self.pipelines.move_to_end(key)
            return self.pipelines[key]
        plan = build_plan(reducer, keep=keep)  # a bad spec fails here, before a model is loaded for it
        base = self._model(model)
        pipeline = Pipeline(base.model, base.processor, plan, name=base.name)
        self.pipelines[key] = pipeline
        while len(self.pipelines) > self.max_pipelines:
            self.pipelines.popitem(last=False)
        return pipeline

    def _model(self, model: str):
        import tokenomy

        if model in self.models:
            self.models.move_to_end(model)
            return self.models[model]
        base = tokenomy.load(model)
        self.models[model] = base
        while len(self.models) > self.max_models:
            evicted, _ = self.models.popitem(last=False)
            for key in [key for key in self.pipelines if key[0] == evicted]:
                del self.pipelines[key]
        return base


def split_uploads(paths) -> tuple[list, list]:
    """(images, videos) by file suffix: the processor needs to know which is which before reading them."""
    images, videos = [], []
    for path in paths:
        (videos if Path(path).suffix.lower() in VIDEO_SUFFIXES else images).append(str(path))
    return images, videos


def uploads_in_history(history) -> list:
    """The files of the latest user turn that had any, so a follow-up question is about the same picture."""
    for message in reversed(history or []):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        items = content if isinstance(content, list) else [content]
        paths = [item["file"]["path"] for item in items
                 if isinstance(item, dict) and item.get("type") == "file" and isinstance(item.get("file"), dict)]
        if paths:
            return paths
    return []


def parse_keep(keep):
    """The budget field: blank or 0 means the reducer's own default."""
    if keep in (None, ""):
        return None
    try:
        value = float(keep)
    except (TypeError, ValueError):
        value = float("nan")
    if not value.is_integer() or value < 0:
        raise InputError(f"keep must be a whole number of visual tokens (0 = the reducer's default), got {keep!r}")
    return int(value) or None


def summary(generation) -> dict:
    stats = generation.stats
    return dict(
        answer=generation.text.strip(), reducer=stats["reducer"], keep=stats["keep"],
        visual_tokens_in=stats["visual_tokens_in"], visual_tokens_kept=stats["visual_tokens_kept"],
        prefill_tokens=stats["prefill_tokens"], prefill_ms=round(stats["prefill_ms"], 1),
        decode_ms=round(stats["decode_ms"], 1), new_tokens=stats["new_tokens"],
    )


def _cell(text: str) -> str:
    """Text safe inside one markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"


def format_reply(reduced: dict, full: dict | None) -> str:
    label = f"{reduced['reducer']}" + (f", keep={reduced['keep']}" if reduced["keep"] is not None else "")
    if full is None:
        return (f"{reduced['answer'] or '(empty answer)'}\n\n"
                f"*{label}: visual tokens kept / in: {reduced['visual_tokens_kept']} / {reduced['visual_tokens_in']}"
                f" · prefill {reduced['prefill_ms']:.1f} ms*")
    rows = [
        f"| | {_cell(label)} | without reduction |",
        "|---|---|---|",
        f"| answer | {_cell(reduced['answer'])} | {_cell(full['answer'])} |",
        f"| visual tokens kept / in | {reduced['visual_tokens_kept']} / {reduced['visual_tokens_in']}"
        f" | {full['visual_tokens_kept']} / {full['visual_tokens_in']} |",
        f"| prefill ms | {reduced['prefill_ms']:.1f} | {full['prefill_ms']:.1f} |",
    ]
    return "\n".join(rows)


def kept_tokens_picture(generation, image_path):
    """tokenomy.vis's picture of what survived of the prompt's first image, scaled to the uploaded image's size."""
    from tokenomy.vis import draw_selection

    return draw_selection(generation, image=image_path, index=0)


class ChatSession:
    """The chat function of the app, with the pipeline cache it answers from."""

    def __init__(self, cache: PipelineCache | None = None):
        self.cache = cache or PipelineCache()
        # The chat window and the /chat endpoint are separate gradio events, each with its own queue slot, and the
        # pipelines of one model share it: LLM-site reducers hook its layers while they run, so runs take turns.
        self.model_lock = threading.Lock()

    def answer(self, message, history, model, reducer, keep, side_by_side, max_new_tokens):
        """(reply markdown, picture of the kept tokens or None, stats) for one chat turn."""
        gr = import_gradio()
        try:
            return self._answer(message, history, model, reducer, keep, side_by_side, max_new_tokens)
        except TokenomyError as exc:
            problem = str(exc)
        except Exception as exc:  # the UI boundary: whatever else broke is reported in the chat, the trace goes to the log
            log.exception("demo vlm: a chat turn failed")
            problem = f"the model run failed: {type(exc).__name__}: {exc}"
        gr.Warning(problem)
        return f"⚠️ {problem}", None, {"error": problem}

    def reply(self, message, model, reducer, keep, side_by_side, max_new_tokens):
        """One turn without a conversation before it: the `/chat` API endpoint."""
        return self.answer(message, [], model, reducer, keep, side_by_side, max_new_tokens)

    def _answer(self, message, history, model, reducer, keep, side_by_side, max_new_tokens):
        text = (message.get("text") or "").strip()
        files = [f["path"] if isinstance(f, dict) else f for f in message.get("files") or []] or uploads_in_history(history)
        if not text:
            raise InputError("type a question about the image (the message text is empty)")
        model, reducer = (model or DEFAULT_MODEL).strip(), (reducer or FULL).strip()
        images, videos = split_uploads(files)
        runs = [(reducer, parse_keep(keep))] + ([(FULL, None)] if side_by_side else [])
        results = []
        with self.model_lock:
            for spec, budget in runs:
                pipeline = self.cache.get(model, spec, budget)
                (generation,) = pipeline.generate([images or None], [text], max_new_tokens=int(max_new_tokens),
                                                  videos=[videos or None])
                results.append(generation)
        reduced = summary(results[0])
        full = summary(results[1]) if side_by_side else None
        picture = kept_tokens_picture(results[0], images[0]) if images else None  # tokenomy.vis draws images, not videos
        return format_reply(reduced, full), picture, {"reduced": reduced, **({"full": full} if full else {})}


def example_scene() -> str:
    """A synthvqa test scene written to a temporary file: the example the app offers (ref-llava-e2e answers 'yellow')."""
    import os
    import tempfile

    from tokenomy.eval import synthvqa

    path = Path(tempfile.gettempdir()) / "tokenomy-demo-scene-test-0.png"
    if not path.is_file():
        partial = path.with_suffix(f".{os.getpid()}.png")  # written whole, then renamed: no reader sees half a file
        synthvqa.render(synthvqa.make_scene("test", 0)).save(partial)
        os.replace(partial, path)
    return str(path)


def build_app(model: str = DEFAULT_MODEL, reducer: str = DEFAULT_REDUCER, keep: int = DEFAULT_KEEP,
              max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, session: ChatSession | None = None):
    """The gr.Blocks app. Its API endpoint `/chat` takes (message {"text", "files"}, model, reducer, keep, side_by_side,
    max_new_tokens) and returns (reply markdown, picture, stats).

    The chat window's own endpoint (`/chat_turn`) returns its outputs unprocessed, as gr.ChatInterface does for its API,
    so a client would get no picture from it: `/chat` runs the same turn as an ordinary event whose picture gradio
    serves as a file."""
    gr = import_gradio()
    from tokenomy.reducers import available
    from tokenomy.vlm.pipeline import available_models

    session = session or ChatSession()
    picture = gr.Image(label="Kept tokens (tokenomy.vis)", type="pil", interactive=False, render=False)
    stats = gr.JSON(label="Stats", render=False)
    settings = [
        gr.Dropdown(available_models(), value=model, allow_custom_value=True, label="Model",
                    info="a built-in name or the path of a local model folder"),
        gr.Dropdown(available(), value=reducer, allow_custom_value=True, label="Reducer",
                    info="a registered reducer or a stacked spec such as vtc-cls:keep=128+fastv"),
        gr.Number(value=keep, precision=0, minimum=0, label="keep",
                  info="visual tokens per image the last stage keeps; 0 = its default"),
        gr.Checkbox(value=False, label="Side by side: also answer without reduction"),
        gr.Slider(1, 128, value=max_new_tokens, step=1, label="max new tokens"),
    ]
    with gr.Blocks(title="tokenomy: chat with token reduction", analytics_enabled=False) as app:
        gr.Markdown("## tokenomy: chat with visual-token reduction\n"
                    "Upload an image (or a video, for Qwen models), ask a question, "
                    "and see the answer, how many visual tokens the reducer kept and which ones.")
        with gr.Row():
            with gr.Column(scale=3):
                gr.ChatInterface(
                    session.answer, multimodal=True, api_name="chat_turn", api_visibility="undocumented",
                    additional_inputs=settings,
                    additional_inputs_accordion=gr.Accordion("Model and reduction", open=True, render=False),
                    additional_outputs=[picture, stats], fill_height=False, autofocus=False,
                    textbox=gr.MultimodalTextbox(file_types=["image", "video"], file_count="multiple",
                                                 placeholder="Ask about the image; attach an image or a video"),
                    examples=[[{"text": "What color is the small object?", "files": [example_scene()]},
                               model, reducer, keep, False, max_new_tokens]],
                    cache_examples=False,
                )
            with gr.Column(scale=2):
                picture.render()
                stats.render()
        api_message = gr.MultimodalTextbox(file_types=["image", "video"], file_count="multiple", visible=False)
        api_reply = gr.Markdown(visible=False)
        gr.Button(visible=False).click(session.reply, [api_message, *settings], [api_reply, picture, stats], api_name="chat")
    return app
