"""tokenomy.vis: kept tokens drawn clear, dropped ones dimmed by DIM, merged groups outlined in one colour each."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import tokenomy
from tests.test_composed_pipeline import folder  # noqa: F401  the composed-model fixture
from tokenomy.cli import main as cli_main
from tokenomy.errors import InputError
from tokenomy.reducers import Reducer, Selection, Site
from tokenomy.vis import DIM, draw_selection, group_colour

TINY_LLAVA_GRID = 7  # tiny-llava: 56 px images, 8 px patches
CELL = 8


def bright_image(height, width, seed=0):
    """Noise in 64..255: no pixel is 0, so a dimmed pixel always differs from its clear value."""
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(64, 256, size=(height, width, 3)).astype("uint8"))


class FixedSelection(Reducer):
    """Keeps given token indices; optionally merges given members into them."""

    name = "test-fixed"
    site = Site.PRE_PROJECTOR

    def __init__(self, kept, groups=None):
        super().__init__()
        self.kept, self.groups = torch.tensor(kept), groups

    def select(self, image):
        if self.groups is None:
            return Selection.from_indices(image, self.kept)
        index = torch.full((image.num_tokens,), -1, dtype=torch.long)
        for slot, members in enumerate(self.groups):
            index[torch.tensor(members)] = slot
        return Selection(self.kept, image.positions[self.kept], merge_index=index)


def cell(picture, token, grid=TINY_LLAVA_GRID, size=CELL):
    row, column = divmod(token, grid)
    return picture[row * size:(row + 1) * size, column * size:(column + 1) * size]


def generation(model, reducer, image, keep=None):
    (result,) = tokenomy.load(model, reducer, keep=keep).generate([image], ["What is it?"], max_new_tokens=2)
    return result


def test_kept_cells_unchanged_and_dropped_cells_dimmed():
    image = bright_image(56, 56)  # the processor's own size: its resize and crop leave the pixels as they are
    kept = [0, 8, 20, 48]
    result = generation("tiny-llava", FixedSelection(kept), image)
    processed = result.views[0].pixels.numpy().astype(int)
    assert np.abs(processed - np.asarray(image, dtype=int)).max() <= 1  # normalise + un-normalise round trip
    picture = np.asarray(draw_selection(result)).astype(int)
    assert picture.shape == (56, 56, 3)
    dimmed = np.rint(processed * DIM).astype(int)
    for token in range(TINY_LLAVA_GRID ** 2):
        expected = cell(processed, token) if token in kept else cell(dimmed, token)
        assert np.array_equal(cell(picture, token), expected), token
    assert result.stats["kept_indices"] == [kept]


def test_merged_group_outlined_in_its_colour():
    image = bright_image(56, 56, seed=1)
    kept = [0, 24]
    groups = [[0, 1, 2, 7, 8, 9], [24, 25, 31]]  # a 2x3 block and an L shape
    result = generation("tiny-llava", FixedSelection(kept, groups), image)
    view = result.views[0]
    assert view.groups_known
    assert view.owner.tolist() == [0 if t in groups[0] else 24 if t in groups[1] else -1 for t in range(49)]
    processed = view.pixels.numpy().astype(int)
    picture = np.asarray(draw_selection(result)).astype(int)
    for rank, members in enumerate(groups):
        inside = np.zeros((56, 56), dtype=bool)
        for token in members:
            row, column = divmod(token, TINY_LLAVA_GRID)
            inside[row * CELL:(row + 1) * CELL, column * CELL:(column + 1) * CELL] = True
        edge = np.zeros_like(inside)
        for y, x in zip(*np.nonzero(inside)):
            neighbours = [(y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)]
            edge[y, x] = any(not (0 <= a < 56 and 0 <= b < 56) or not inside[a, b] for a, b in neighbours)
        assert (picture[edge] == group_colour(rank)).all()
        assert np.array_equal(picture[inside & ~edge], processed[inside & ~edge])
    assert group_colour(0) != group_colour(1)
    unmerged = [t for t in range(49) if all(t not in members for members in groups)]
    for token in unmerged:
        assert np.array_equal(cell(picture, token), cell(np.rint(processed * DIM).astype(int), token))


def clear_cells(result):
    """(cells drawn unchanged, cells drawn dimmed); every cell must be one of the two."""
    view = result.views[0]
    processed = view.pixels.numpy().astype(int)
    dimmed = np.rint(processed * DIM).astype(int)
    picture = np.asarray(draw_selection(result)).astype(int)
    clear, dark = [], []
    for token, (x0, y0, x1, y1) in enumerate(view.boxes.tolist()):
        drawn = picture[y0:y1, x0:x1]
        if np.array_equal(drawn, processed[y0:y1, x0:x1]):
            clear.append(token)
        else:
            assert np.array_equal(drawn, dimmed[y0:y1, x0:x1]), token
            dark.append(token)
    return clear, dark


CASES = [(model, reducer) for model in ("tiny-llava", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl")
         for reducer in ("random", "fastv")] + [
    ("tiny-llava", "flowcut"), ("tiny-llava-next", "vtc-cls"), ("tiny-llava-next", "flowcut"), ("tiny-qwen2-vl", "flowcut")]


@pytest.mark.parametrize("model,reducer", CASES)
def test_every_family_clear_cells_equal_kept(model, reducer):
    result = generation(model, reducer, bright_image(70, 90), keep=6)
    clear, dark = clear_cells(result)
    assert 0 < len(clear) == result.stats["visual_tokens_kept"] < result.stats["visual_tokens_in"]
    assert clear == sorted(result.stats["kept_indices"][0])
    assert len(clear) + len(dark) == result.stats["visual_tokens_in"]


def test_composed_family(folder):  # noqa: F811
    result = generation(folder, "fastv", bright_image(48, 48), keep=5)
    clear, _ = clear_cells(result)
    assert len(clear) == result.stats["visual_tokens_kept"] == 5


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-llava-next"])
def test_encoder_site_merges_outlined(model):
    result = generation(model, "tome", bright_image(70, 90), keep=6)
    view = result.views[0]
    assert view.groups_known
    picture = np.asarray(draw_selection(result))
    sizes = torch.bincount(view.owner[view.owner >= 0], minlength=len(view.owner))
    merged = torch.nonzero(sizes > 1).squeeze(1).tolist()
    assert merged and set(view.kept.tolist()) >= set(merged)
    for rank, kept in enumerate(merged):
        first = int(torch.nonzero(view.owner == kept)[0])  # its top-left pixel borders lower-index cells or the edge
        x0, y0, _, _ = view.boxes[first].tolist()
        assert tuple(picture[y0, x0]) == group_colour(rank)


def test_qwen_view_is_the_resized_image():
    image = bright_image(112, 140)  # already a multiple of 28 inside the tiny processor's pixel range: no resize
    result = generation("tiny-qwen2-vl", "random", image, keep=4)
    view = result.views[0]
    assert np.abs(view.pixels.numpy().astype(int) - np.asarray(image, dtype=int)).max() <= 1
    assert view.boxes.tolist()[:2] == [[0, 0, 28, 28], [28, 0, 56, 28]]  # one cell = one 2x2 merge unit of 14 px patches


def test_index_and_scaling_and_errors():
    pipeline = tokenomy.load("tiny-llava", "random", keep=3)
    (two,) = pipeline.generate([[bright_image(56, 56), bright_image(56, 56, seed=2)]], ["<image><image>Same?"], max_new_tokens=2)
    assert not np.array_equal(np.asarray(draw_selection(two)), np.asarray(draw_selection(two, index=1)))
    assert draw_selection(two, image=bright_image(200, 130)).size == (112, 112)  # x2: the largest multiple that fits
    with pytest.raises(InputError, match="index=2"):
        draw_selection(two, index=2)
    copy = pickle.loads(pickle.dumps(two))
    assert np.array_equal(np.asarray(draw_selection(copy, index=1)), np.asarray(draw_selection(two, index=1)))
    (text_only,) = pipeline.generate([None], ["Hello"], max_new_tokens=2)
    with pytest.raises(InputError, match="no image views"):
        draw_selection(text_only)


def test_generate_cli_writes_the_picture(tmp_path):
    image_path = tmp_path / "in.png"
    bright_image(56, 56).save(image_path)
    out = tmp_path / "vis.png"
    assert cli_main(["generate", "--model", "tiny-llava", "--image", str(image_path), "--prompt", "What?",
                     "--reducer", "random", "--keep", "5", "--max-new-tokens", "2", "--vis", str(out)]) == 0
    picture = np.asarray(Image.open(out).convert("RGB")).astype(int)
    processed = np.asarray(bright_image(56, 56)).astype(int)
    unchanged = sum(np.abs(cell(picture, t) - cell(processed, t)).max() <= 1 for t in range(49))
    assert unchanged == 5


def test_merge_inside_the_llm_draws_kept_tokens_only():
    # PPE's cascade merges at LLM layers, where members are not traced: the kept tokens are drawn, no group claimed.
    pipeline = tokenomy.load("tiny-llava", "ppe-cascade", keep=6, position_policy="multi", ppe_k=2)
    (result,) = pipeline.generate([bright_image(56, 56)], ["What is it?"], max_new_tokens=2)
    assert result.views[0].groups_known is False
    clear, _ = clear_cells(result)
    assert clear == result.stats["kept_indices"][0] and len(clear) == 6


def test_generate_cli_vis_errors_name_the_option(tmp_path, capsys):
    image_path = tmp_path / "in.png"
    bright_image(56, 56).save(image_path)
    assert cli_main(["generate", "--model", "tiny-llava", "--prompt", "What?", "--vis", str(tmp_path / "v.png")]) == 2
    assert "--vis" in capsys.readouterr().err
    assert cli_main(["generate", "--model", "tiny-llava", "--image", str(image_path), "--prompt", "What?",
                     "--max-new-tokens", "1", "--vis", str(tmp_path / "no_such_folder" / "v.png")]) == 2
    assert "--vis" in capsys.readouterr().err
