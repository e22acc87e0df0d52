import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def random_images(count, seed=0):
    rng = np.random.RandomState(seed)
    return [
        Image.fromarray((rng.rand(60 + 17 * index, 80 + 9 * index, 3) * 255).astype("uint8")) for index in range(count)
    ]


@pytest.fixture
def images():
    return random_images(3)
