"""The ports, built at the released sizes (on the meta device: no memory), have the published parameter counts."""
import pytest
import torch

from tokenomy.generation.arpg import ARPG, ARPG_HEADS, ARPGConfig
from tokenomy.generation.rar import RAR, RAR_SIZES, RARConfig
from tokenomy.tokenizers.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig


def millions(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("name,published", [("rar_b", 261), ("rar_l", 461), ("rar_xl", 955), ("rar_xxl", 1499)])
def test_rar_sizes_match_the_paper(name, published):
    width, depth, hidden = RAR_SIZES[name]
    with torch.device("meta"):
        assert round(millions(RAR(RARConfig(width=width, depth=depth, heads=16, mlp_hidden=hidden)))) in (published, published + 1)


@pytest.mark.parametrize("layers,width,published", [(24, 1024, 320), (36, 1280, 719), (48, 1536, 1300)])
def test_arpg_sizes_match_the_readme(layers, width, published):
    with torch.device("meta"):
        count = millions(ARPG(ARPGConfig(width=width, depth=layers, heads=ARPG_HEADS[(layers, width)])))
    assert abs(count - published) / published < 0.005


def test_llamagen_vq16_size_matches_the_paper():
    with torch.device("meta"):
        assert round(millions(LlamaGenVQ(LlamaGenVQConfig()))) == 72
