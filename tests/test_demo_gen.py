"""`tokenomy demo gen`: the playground's pieces on fixed inputs, then the served app driven through gradio_client."""
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.demo_server import png_claiming_size, serving_cli
from tokenomy.demo.gen import UNDECODED_GREY, Decoding, Playground, check_region, reveal_frames
from tokenomy.errors import InputError

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def playground():
    return Playground()


def test_reveal_frames_show_decoded_cells_unchanged_and_the_rest_grey():
    # a 2x2 token grid over a 4x4 image, one colour per cell; decoded in the order 3, then 0 and 2, then 1
    image = np.zeros((4, 4, 3), np.uint8)
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (200, 200, 10)]
    for cell, colour in enumerate(colours):
        row, col = divmod(cell, 2)
        image[2 * row:2 * row + 2, 2 * col:2 * col + 2] = colour
    frames = reveal_frames(Decoding(np.arange(4), image, [[3], [0, 2], [1]]), (2, 2), scale=8)
    assert len(frames) == 3 and all(frame.size == (32, 32) for frame in frames)
    centre = lambda frame, cell: tuple(np.asarray(frame)[16 * (cell // 2) + 8, 16 * (cell % 2) + 8])
    decoded_after = [{3}, {0, 2, 3}, {0, 1, 2, 3}]
    for frame, decoded in zip(frames, decoded_after):
        for cell in range(4):
            assert centre(frame, cell) == (colours[cell] if cell in decoded else (UNDECODED_GREY,) * 3)
    # the cells of the step just taken are outlined: their border pixel is neither the cell's colour nor grey
    corner = tuple(np.asarray(frames[0])[16, 16])
    assert corner not in (colours[3], (UNDECODED_GREY,) * 3)


def test_region_must_fit_the_grid_and_leave_something_known():
    assert check_region(1, 2, 3, 4, (8, 8)) == (1, 2, 3, 4)
    for region in [(6, 0, 3, 1), (0, 0, 0, 2), (-1, 0, 2, 2)]:
        with pytest.raises(InputError, match="token grid"):
            check_region(*region, (8, 8))
    with pytest.raises(InputError, match="every cell"):
        check_region(0, 0, 8, 8, (8, 8))


def test_sample_records_every_cell_once_and_inpaint_keeps_the_rest(playground):
    decoding = playground.sample(5, "randar", steps=8, seed=3)
    cells = [cell for step in decoding.steps for cell in step]
    assert len(decoding.steps) == 8 and sorted(cells) == list(range(64))
    assert decoding.image.shape == (32, 32, 3) and decoding.image.std() > 0
    filled = playground.inpaint(decoding.tokens, (2, 3, 4, 2), 5, seed=1)
    outside = np.ones((8, 8), bool)
    outside[2:6, 3:5] = False
    assert np.array_equal(filled.tokens.reshape(8, 8)[outside], decoding.tokens.reshape(8, 8)[outside])
    assert sorted(cell for step in filled.steps for cell in step) == sorted(np.flatnonzero(~outside).tolist())
    raster = playground.sample(5, "raster", seed=3)
    assert raster.steps == [[cell] for cell in range(64)]


def test_prefix_decoding_is_deterministic_and_depends_on_k(playground):
    image = playground.sample(2, "raster", seed=0).image
    one, again, every = playground.prefixes(image, [1, 1, 16], seed=4)
    assert np.array_equal(one, again)  # the same noise: only k changes what comes out
    assert not np.array_equal(one, every)
    with pytest.raises(InputError, match="k must be in 1..16"):
        playground.prefixes(image, [17])


def _gallery_paths(gallery):
    return [item["image"] if isinstance(item, dict) else item[0] for item in gallery]


def listening_addresses(port: int) -> list:
    """IPv4 addresses with a socket listening on `port`, read from Linux's /proc/net/tcp (hex, little-endian)."""
    table = Path("/proc/net/tcp")
    if not table.is_file():
        pytest.skip("no /proc/net/tcp to read which address the server bound")
    found = []
    for line in table.read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if int(local_port, 16) == port and state == "0A":  # 0A: LISTEN
            found.append(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_served_playground_through_gradio_client(tmp_path):
    Client, handle_file = gradio_client.Client, gradio_client.handle_file
    with serving_cli(["gen", "--max-file-size", "64kb"], tmp_path / "server.log") as (url, _):
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        assert listening_addresses(port) == ["127.0.0.1"]  # this machine only, not 0.0.0.0
        client = Client(url, verbose=False)
        endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert {"/sample", "/inpaint", "/coarse_to_fine"} <= set(endpoints)

        # before any sample, an edit has nothing to start from: a message, not an error
        _, _, status = client.predict(None, "red circle", 2, 2, 4, 4, 2.0, 0, api_name="/inpaint")
        assert "sample one first" in status

        sample, gif, frames, status = client.predict("green square", "randar", 8, "random", 2.0, 1, api_name="/sample")
        assert "64 tokens in 8 steps" in status
        assert Image.open(sample).size == (256, 256)
        with Image.open(gif) as animation:
            assert animation.is_animated and animation.n_frames == 8
        assert len(frames) == 8 and all(Image.open(path).size == (256, 256) for path in _gallery_paths(frames))

        masked, inpainted, status = client.predict(None, "green square", 2, 2, 4, 4, 2.0, 0, api_name="/inpaint")
        assert "inpainted 16 of 64 token cells" in status
        sampled, filled = np.asarray(Image.open(sample)), np.asarray(Image.open(inpainted))
        assert sampled.shape == filled.shape and not np.array_equal(sampled, filled)
        assert np.asarray(Image.open(masked)).std() > 0

        original, prefix, strip, status = client.predict(None, 2, 0, api_name="/coarse_to_fine")
        assert "first 2 of 16 ordered tokens" in status
        assert np.array_equal(np.asarray(Image.open(original)), sampled)
        assert Image.open(prefix).size == (256, 256) and Image.open(strip).size == (5 * 128, 128)

        upload = tmp_path / "upload.png"
        Image.fromarray(np.tile(np.linspace(0, 255, 50, dtype=np.uint8)[None, :, None], (40, 1, 3))).save(upload)
        original, _, _, status = client.predict(handle_file(str(upload)), 16, 0, api_name="/coarse_to_fine")
        assert "first 16 of 16" in status and Image.open(original).size == (256, 256)

        corrupt = tmp_path / "corrupt.png"
        corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
        *_, status = client.predict(handle_file(str(corrupt)), "red circle", 2, 2, 4, 4, 2.0, 0, api_name="/inpaint")
        assert "cannot read image" in status
        bomb = png_claiming_size(tmp_path / "bomb.png", 30000, 30000)
        *_, status = client.predict(handle_file(str(bomb)), 4, 0, api_name="/coarse_to_fine")
        assert "too large to decode safely" in status
        huge = tmp_path / "huge.png"
        huge.write_bytes(b"\x89PNG" + bytes(100 * 1024))
        with pytest.raises(ValueError, match="maximum file size"):
            client.predict(handle_file(str(huge)), 4, 0, api_name="/coarse_to_fine")
        # the cap is the server's, not only the client's: a direct upload of the same file is refused
        import httpx

        refused = httpx.post(f"{url}gradio_api/upload", files={"files": ("huge.png", huge.read_bytes(), "image/png")})
        assert refused.status_code == 413
        text = tmp_path / "notes.txt"
        text.write_text("not a picture")
        with pytest.raises(gradio_client.exceptions.AppError, match="Invalid file type"):
            client.predict(handle_file(str(text)), 4, 0, api_name="/coarse_to_fine")
    # every bad input above reached the user as a message: no trace ran through the playground's own code
    assert "tokenomy/demo" not in (tmp_path / "server.log").read_text()
