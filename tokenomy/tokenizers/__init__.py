"""Image tokenizers: VQ and FSQ quantizers, a 2D grid VQ tokenizer, TiTok-style 1D and ordered FlexTok-style 1D,
and architecture-exact ports of released ones (LlamaGen VQ, official TiTok) for loading their weights."""
from tokenomy.tokenizers.base import TOKENIZERS, ImageTokenizer, load_tokenizer
from tokenomy.tokenizers.flextok import FlexTokConfig, FlexTokTokenizer
from tokenomy.tokenizers.fsq import FSQ
from tokenomy.tokenizers.grid_vq import GridVQConfig, GridVQTokenizer
from tokenomy.tokenizers.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig
from tokenomy.tokenizers.titok import TiTokConfig, TiTokTokenizer
from tokenomy.tokenizers.titok_official import OfficialTiTok, OfficialTiTokConfig
from tokenomy.tokenizers.vq import VectorQuantizer

__all__ = ["TOKENIZERS", "ImageTokenizer", "load_tokenizer", "FSQ", "VectorQuantizer", "GridVQConfig", "GridVQTokenizer",
           "LlamaGenVQConfig", "LlamaGenVQ",
           "TiTokConfig", "TiTokTokenizer", "OfficialTiTokConfig", "OfficialTiTok", "FlexTokConfig", "FlexTokTokenizer"]
