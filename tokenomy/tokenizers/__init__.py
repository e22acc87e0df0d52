"""Image tokenizers: VQ and FSQ quantizers, a 2D grid VQ tokenizer, TiTok-style 1D and ordered FlexTok-style 1D."""
from tokenomy.tokenizers.base import TOKENIZERS, ImageTokenizer, load_tokenizer
from tokenomy.tokenizers.flextok import FlexTokConfig, FlexTokTokenizer
from tokenomy.tokenizers.fsq import FSQ
from tokenomy.tokenizers.grid_vq import GridVQConfig, GridVQTokenizer
from tokenomy.tokenizers.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig
from tokenomy.tokenizers.titok import TiTokConfig, TiTokTokenizer
from tokenomy.tokenizers.vq import VectorQuantizer

__all__ = ["TOKENIZERS", "ImageTokenizer", "load_tokenizer", "FSQ", "VectorQuantizer", "GridVQConfig", "GridVQTokenizer",
           "LlamaGenVQConfig", "LlamaGenVQ",
           "TiTokConfig", "TiTokTokenizer", "FlexTokConfig", "FlexTokTokenizer"]
