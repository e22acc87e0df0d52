"""tokenomy: make vision-language models cheaper without retraining them."""
from tokenomy.errors import InputError, ModelLoadError, ShapeError, TokenomyError, UnknownNameError

__version__ = "0.1.0"

__all__ = ["load", "InputError", "ModelLoadError", "ShapeError", "TokenomyError", "UnknownNameError", "__version__"]


def load(model, reducer="none", device=None, dtype=None, **reducer_kwargs):
    """Load a model (local HF folder or built-in name) with a token reducer; returns a `Pipeline`."""
    from tokenomy.vlm.pipeline import load as _load

    return _load(model, reducer=reducer, device=device, dtype=dtype, **reducer_kwargs)
