"""`tokenomy demo vlm`: the chat's pieces on fixed inputs, then the served app driven through gradio_client."""
import os

import numpy as np
import pytest
from PIL import Image

from tests.demo_server import png_claiming_size, serving_in_thread
from tests.media_fixtures import write_video
from tokenomy.demo.vlm import (ChatSession, PipelineCache, build_app, example_scene, format_reply, parse_keep, split_uploads,
                               uploads_in_history)
from tokenomy.demo.serving import parse_file_size
from tokenomy.errors import InputError, UnknownNameError

gradio_client = pytest.importorskip("gradio_client")
QUESTION = "What color is the small object?"  # ref-llava-e2e answers the example scene with 'yellow' (README)


def test_keep_field_blank_or_zero_means_the_reducer_default():
    assert parse_keep(None) is None and parse_keep("") is None and parse_keep(0) is None and parse_keep(0.0) is None
    assert parse_keep(64.0) == 64 and parse_keep("32") == 32
    for bad in (-1, 2.5, "many"):
        with pytest.raises(InputError, match="keep must be a whole number"):
            parse_keep(bad)


def test_uploads_sorted_by_kind_and_found_again_in_history():
    images, videos = split_uploads(["/a/x.PNG", "/a/clip.MP4", "/a/y.jpg", "/a/z.webm"])
    assert images == ["/a/x.PNG", "/a/y.jpg"] and videos == ["/a/clip.MP4", "/a/z.webm"]
    history = [  # gradio 6 chat history as the Chatbot hands it to the chat function
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/first.png"}}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "and the big one?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
    ]
    assert uploads_in_history(history) == ["/tmp/first.png"]
    assert uploads_in_history(history[2:]) == [] and uploads_in_history(None) == []


def test_side_by_side_reply_is_one_table_with_both_answers():
    reduced = dict(answer="a | b\nc", reducer="fastv", keep=32, visual_tokens_in=256, visual_tokens_kept=32, prefill_ms=12.34)
    full = dict(answer="yellow", reducer="none", keep=None, visual_tokens_in=256, visual_tokens_kept=256, prefill_ms=20.0)
    table = format_reply(reduced, full).splitlines()
    assert table[0] == "| | fastv, keep=32 | without reduction |"
    assert table[2] == "| answer | a \\| b c | yellow |"  # a pipe or a newline in an answer cannot break the table
    assert table[3] == "| visual tokens kept / in | 32 / 256 | 256 / 256 |" and table[4] == "| prefill ms | 12.3 | 20.0 |"
    single = format_reply(reduced, None)
    assert single.startswith("a | b\nc") and "kept / in: 32 / 256" in single and "12.3 ms" in single


def test_pipeline_cache_shares_the_model_and_stays_bounded():
    cache = PipelineCache(max_models=1, max_pipelines=2)
    first = cache.get("tiny-llava", "random", 8)
    assert cache.get("tiny-llava", "random", 8) is first
    second = cache.get("tiny-llava", "vtc-cls:keep=16+fastv", 4)
    assert second.model is first.model and second.plan.spec == "vtc-cls:keep=16+fastv"
    cache.get("tiny-llava", "none", None)
    assert len(cache.pipelines) == 2 and ("tiny-llava", "random", 8) not in cache.pipelines
    with pytest.raises(UnknownNameError, match="known reducers"):
        cache.get("tiny-llava", "fast-v", None)
    cache.get("tiny-qwen2-vl", "none", None)  # a second model evicts the first and its pipelines
    assert list(cache.models) == ["tiny-qwen2-vl"] and all(key[0] == "tiny-qwen2-vl" for key in cache.pipelines)


def test_a_turn_on_qwen_draws_its_merged_grid_and_a_text_only_turn_draws_nothing():
    session = ChatSession()
    reply, picture, stats = session.reply({"text": "what is it?", "files": [example_scene()]}, "tiny-qwen2.5-vl", "random", 8,
                                          False, 2)
    assert stats["reduced"]["visual_tokens_kept"] == 8 and stats["reduced"]["visual_tokens_in"] > 8
    assert picture.size == (140, 140) and np.asarray(picture).std() > 0  # drawn over the 140 px image Qwen read (5x5 merged)
    reply, picture, stats = session.reply({"text": "hello", "files": []}, "tiny-qwen2.5-vl", "random", 8, False, 2)
    assert picture is None and stats["reduced"]["visual_tokens_in"] == 0 and not reply.startswith("⚠️")


def test_file_size_option_reads_units_and_refuses_nonsense():
    assert parse_file_size("20mb") == 20 * 2**20 and parse_file_size("512KB") == 512 * 1024 and parse_file_size(1000) == 1000
    for bad in ("lots", "0kb", "-1mb"):
        with pytest.raises(InputError, match="max-file-size"):
            parse_file_size(bad)


def test_command_refuses_a_bad_start_before_serving(capsys, tmp_path):
    from tokenomy.cli import main

    for args, message in [(["--model", str(tmp_path / "missing")], "does not exist"),
                          (["--reducer", "fast-v"], "unknown reducer 'fast-v'"),
                          (["--max-file-size", "lots"], "--max-file-size 'lots'")]:
        assert main(["demo", "vlm", *args, "--port", "1"]) == 2
        assert message in capsys.readouterr().err


def _chat(client, files, text=QUESTION, model="ref-llava-e2e", reducer="vtc-cls", keep=64, side_by_side=False, max_new_tokens=8):
    handle = gradio_client.handle_file
    return client.predict({"text": text, "files": [handle(str(f)) for f in files]}, model, reducer, keep, side_by_side,
                          max_new_tokens, api_name="/chat")


def test_served_chat_through_gradio_client(tmp_path, caplog):
    session = ChatSession()
    scene = example_scene()
    app = build_app(session=session)
    assert app.analytics_enabled is False and os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    with serving_in_thread(app, max_file_size="64kb") as url:
        client = gradio_client.Client(url, verbose=False)
        assert "/chat" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]

        reply, picture, stats = _chat(client, [scene])
        assert reply.startswith("yellow") and "kept / in: 64 / 256" in reply and " ms" in reply
        assert stats["reduced"]["visual_tokens_kept"] == 64 and stats["reduced"]["visual_tokens_in"] == 256
        assert stats["reduced"]["answer"] == "yellow" and stats["reduced"]["prefill_ms"] > 0
        drawn = np.asarray(Image.open(picture).convert("RGB"))
        assert drawn.shape[0] <= 128 and drawn.shape[1] <= 128 and drawn.std() > 0  # fits the 128 px upload

        reply, picture, stats = _chat(client, [scene], reducer="fastv", keep=32, side_by_side=True)
        assert "without reduction" in reply and "| 32 / 256 | 256 / 256 |" in reply
        assert stats["full"]["visual_tokens_kept"] == stats["full"]["visual_tokens_in"] == 256
        assert stats["reduced"]["visual_tokens_kept"] == 32 and picture is not None
        reply, _, stats = _chat(client, [scene], reducer="vtc-cls:keep=128+fastv", keep=16)
        assert stats["reduced"]["reducer"] == "vtc-cls:keep=128+fastv" and stats["reduced"]["visual_tokens_kept"] == 16
        assert set(session.cache.pipelines) == {("ref-llava-e2e", "vtc-cls", 64), ("ref-llava-e2e", "fastv", 32),
                                                ("ref-llava-e2e", "none", None), ("ref-llava-e2e", "vtc-cls:keep=128+fastv", 16)}
        assert list(session.cache.models) == ["ref-llava-e2e"]

        video = write_video(tmp_path / "clip.mp4", n_frames=8, size=64)
        reply, picture, stats = _chat(client, [video], model="tiny-qwen2-vl", reducer="random", keep=4)
        assert not reply.startswith("⚠️") and stats["reduced"]["visual_tokens_in"] > 4
        assert stats["reduced"]["visual_tokens_kept"] == 4 and picture is None  # tokenomy.vis draws images only

        corrupt = tmp_path / "corrupt.png"
        corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
        bomb = png_claiming_size(tmp_path / "bomb.png", 30000, 30000)
        for files, kwargs, message in [
            ([scene], dict(reducer="fast-v"), "unknown reducer 'fast-v'"),
            ([scene], dict(reducer="vtc-cls:keep=128+fastv", keep=0, model=str(tmp_path / "no-model")), "does not exist"),
            ([corrupt], {}, "cannot read image"),
            ([bomb], {}, "too large to decode safely"),
            ([video], {}, "llava models do not read videos"),
            ([scene], dict(text="   "), "type a question"),
        ]:
            reply, picture, stats = _chat(client, files, **kwargs)
            assert reply.startswith("⚠️") and message in reply, (message, reply)
            assert message in stats["error"] and picture is None

        huge = tmp_path / "huge.png"
        huge.write_bytes(b"\x89PNG" + bytes(100 * 1024))
        with pytest.raises(ValueError, match="maximum file size"):
            _chat(client, [huge])
        import httpx

        refused = httpx.post(f"{url}gradio_api/upload", files={"files": ("huge.png", huge.read_bytes(), "image/png")})
        assert refused.status_code == 413  # the server enforces the cap, not only the client
        text = tmp_path / "notes.txt"
        text.write_text("not a picture")
        with pytest.raises(gradio_client.exceptions.AppError, match="Invalid file type"):
            _chat(client, [text])
    # every failure above was one tokenomy names; none fell through to the catch-all that logs a trace
    assert not [record for record in caplog.records if record.name.startswith("tokenomy.demo")]
