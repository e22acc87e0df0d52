import os

import numpy as np
import pytest
import torch
from PIL import Image

# Without a GPU the Triton kernel tests run in Triton's CPU interpreter, which must be chosen before anything
# imports triton (torch.compile and transformers can); tests that never launch a Triton kernel are unaffected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def random_images(count, seed=0):
    rng = np.random.RandomState(seed)
    return [
        Image.fromarray((rng.rand(60 + 17 * index, 80 + 9 * index, 3) * 255).astype("uint8")) for index in range(count)
    ]


@pytest.fixture
def images():
    return random_images(3)
