"""Any-order AR image generation (raster GPT, RandAR with parallel decoding) and test-time search."""
from tokenomy.generation.base import GENERATORS, ARConfig, ARGenerator, load_generator
from tokenomy.generation.randar import RandAR, cosine_step_sizes
from tokenomy.generation.raster_ar import RasterAR

__all__ = ["GENERATORS", "ARConfig", "ARGenerator", "load_generator", "RandAR", "RasterAR", "cosine_step_sizes"]
