"""Standalone audio on tiny-qwen2.5-omni ('<audio>' with a file or 16 kHz samples): identical to the stock thinker,
also next to a video with its own track; random, fastv and seats apply to it, batch = singles; clear errors. A batch
whose prompts mix heard and silent videos equals its single runs; one prompt mixing them is refused."""
import av
import numpy as np
import pytest
import torch

import tokenomy
from tests.test_seats_omni import OPTIONS
from tests.test_vlm_omni import clip
from tests.media_fixtures import write_video
from tokenomy.cli import main as cli_main
from tokenomy.errors import InputError
from tokenomy.io import load_audio

RATE = 16000


def tone(hz, seconds):
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(RATE * seconds)) / RATE)).astype(np.float32)


def write_wav(path, seconds, rate=44100):
    """A stereo 16-bit WAV of a 440 Hz tone, written with PyAV."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate)
        stream.layout = "stereo"
        samples = (0.5 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.stack([samples, samples]).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def omni():
    return tokenomy.load("tiny-qwen2.5-omni", "none")


PROMPTS = ["Listen <audio> and say what it is.", "<video> and then <audio>: the same sound?", "Hear this."]


def inputs():
    return [None, clip(0), None], [tone(440, 3.0), tone(300, 1.5), tone(500, 2.0)]


def test_standalone_audio_equals_the_stock_thinker(omni):
    videos, audios = inputs()
    _, _, info = omni.prepare([None] * 3, PROMPTS, videos, audios)
    batch = info["batch"]
    kinds = [item.token_ids for item in info["encoded"]]
    audio_id, video_id = omni.adapter.audio_token_id, omni.adapter.video_token_id
    assert kinds == [(audio_id,), (video_id, audio_id), (audio_id,), (audio_id,)]  # sequence order; the last prompt: no marker
    sizes = [item.num_tokens_in for item in info["encoded"]]
    assert [sizes[0], sizes[2], sizes[3]] == [75, 37, 50]  # 25 tokens a second
    with torch.no_grad():
        stock = omni.model(**batch).logits
    ours = omni.forward([None] * 3, PROMPTS, videos, audios)
    assert ours.shape == stock.shape and (ours - stock).abs().max().item() <= 1e-5
    with torch.no_grad():
        stock_ids = omni.model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=omni.adapter.tokenizer.pad_token_id)
    for generation, row in zip(omni.generate([None] * 3, PROMPTS, max_new_tokens=4, videos=videos, audios=audios),
                               stock_ids[:, batch["input_ids"].shape[1]:].tolist()):
        assert generation.token_ids == row[: len(generation.token_ids)]


def test_an_audio_file_is_read_at_16_khz_mono(omni, tmp_path):
    path = write_wav(tmp_path / "a.wav", seconds=2.0)
    samples = load_audio(path)
    assert samples.dtype == np.float32 and abs(samples.size - 2 * RATE) <= 64
    (from_file,) = omni.generate(None, "<audio> What is it?", max_new_tokens=2, audios=path)
    (from_samples,) = omni.generate(None, "<audio> What is it?", max_new_tokens=2, audios=samples)
    assert from_file.token_ids == from_samples.token_ids
    assert from_file.stats["visual_tokens_in_per_modality"] == {"audio": 50}


@pytest.mark.parametrize("reducer, options", [("random", dict(keep=10)), ("fastv", dict(keep=10, layer=2))])
def test_baselines_prune_standalone_audio_and_batch_equals_singles(reducer, options):
    pipeline = tokenomy.load("tiny-qwen2.5-omni", reducer, **options)
    videos, audios = inputs()
    together = pipeline.generate([None] * 3, PROMPTS, max_new_tokens=3, videos=videos, audios=audios)
    for prompt, video, audio, joint in zip(PROMPTS, videos, audios, together):
        (alone,) = pipeline.generate([None], [prompt], max_new_tokens=3, videos=[video], audios=[audio])
        assert alone.token_ids == joint.token_ids and alone.stats["kept_indices"] == joint.stats["kept_indices"]
    assert [len(g.stats["kept_indices"]) for g in together] == [1, 2, 1]
    assert together[0].stats["visual_tokens_kept"] == 10 and together[1].stats["visual_tokens_kept"] == 20


def test_seats_on_standalone_audio():
    pipeline = tokenomy.load("tiny-qwen2.5-omni", "seats", **OPTIONS)
    (generation,) = pipeline.generate(None, "<audio> What is it?", max_new_tokens=2, audios=tone(440, 4.0))
    stats = generation.stats
    assert stats["visual_tokens_in_per_modality"] == {"audio": 100}
    # Stage I: two windows of 50 tokens, round(1.4 * 0.65 * 50) each; Stage III removes all before layer 3.
    per_layer = stats["visual_tokens_per_layer_per_modality"]["audio"]
    assert per_layer[0] == 2 * round(1.4 * 0.65 * 50) and per_layer[0] >= per_layer[1] >= per_layer[2] > 0 and per_layer[3] == 0
    assert stats["layer_averaged_retention_per_modality"]["audio"] == pytest.approx(0.65, abs=0.05)


def test_bad_audio_is_refused(omni):
    with pytest.raises(InputError, match="do not hear audio"):
        tokenomy.load("tiny-qwen2-vl", "none").generate(None, "<audio>?", audios=tone(440, 1.0))
    with pytest.raises(InputError, match="empty"):
        omni.generate(None, "<audio>?", audios=np.zeros(0, np.float32))
    with pytest.raises(InputError, match=r"mono samples \[S\]"):
        omni.generate(None, "<audio>?", audios=np.zeros((2, 100), np.float32))
    with pytest.raises(InputError, match="NaN"):
        omni.generate(None, "<audio>?", audios=np.full(100, np.nan, np.float32))
    with pytest.raises(InputError, match="2 '<audio>' placeholders but 1 audios"):
        omni.generate(None, "<audio> and <audio>?", audios=[tone(440, 1.0)])
    with pytest.raises(InputError, match="reserved token"):
        omni.generate(None, "<|AUDIO|> here", audios=tone(440, 1.0))


@pytest.mark.parametrize("reducer, options", [("none", {}), ("random", dict(keep=12))])
def test_heard_and_silent_videos_in_one_batch_equal_singles(reducer, options):
    pipeline = tokenomy.load("tiny-qwen2.5-omni", reducer, **options)
    prompts = ["<video>What happens?", "Describe <video> in words.", "<video> and <audio>?"]
    videos = [clip(0), {"frames": clip(1, frames=12)["frames"]}, {"frames": clip(2)["frames"]}]
    audios = [None, None, tone(440, 1.0)]
    logits = pipeline.forward([None] * 3, prompts, videos, audios)
    together = pipeline.generate([None] * 3, prompts, max_new_tokens=4, videos=videos, audios=audios, eos_token_id=None)
    for index, (prompt, video, audio, joint) in enumerate(zip(prompts, videos, audios, together)):
        alone_logits = pipeline.forward([None], [prompt], [video], [audio])
        assert (alone_logits[0, -1] - logits[index, -1]).abs().max().item() <= 1e-5
        (alone,) = pipeline.generate([None], [prompt], max_new_tokens=4, videos=[video], audios=[audio], eos_token_id=None)
        assert alone.token_ids == joint.token_ids and alone.stats["kept_indices"] == joint.stats["kept_indices"]
    assert together[0].stats["video_audio"][0].endswith("(given)") and together[1].stats["video_audio"] == ["none: not given"]
    assert list(together[0].stats["visual_tokens_in_per_modality"]) == ["video", "audio"]
    assert list(together[1].stats["visual_tokens_in_per_modality"]) == ["video"]


def test_one_prompt_mixing_heard_and_silent_videos_is_refused(omni):
    with pytest.raises(InputError, match="prompt 0 holds videos with and without an audio track"):
        omni.generate(None, "<video> and <video>?", videos=[clip(0), {"frames": clip(1)["frames"]}])


def test_generate_command_takes_videos_and_audios(tmp_path, capsys):
    video = write_video(tmp_path / "v.mp4", n_frames=16, size=56, audio_seconds=2.0)
    audio = write_wav(tmp_path / "a.wav", seconds=1.0)
    assert cli_main(["generate", "--model", "tiny-qwen2.5-omni", "--video", str(video), "--audio", str(audio), "--prompt",
                     "<video> then <audio>?", "--reducer", "random", "--keep", "20", "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr().out
    assert "layer-averaged retention: video " in printed and ", audio " in printed
