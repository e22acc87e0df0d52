"""tokenomy: make vision-language models cheaper without retraining them."""
import importlib
import importlib.util
import pkgutil

from tokenomy import errors
from tokenomy.errors import InputError, ModelLoadError, ShapeError, TokenomyError, UnknownNameError

__version__ = "0.1.0"

__all__ = ["load", "errors", "InputError", "ModelLoadError", "ShapeError", "TokenomyError", "UnknownNameError", "__version__"]


def load(model, reducer="none", device=None, dtype=None, position_policy=None, keep=None, **reducer_options):
    """Load a model (local HF folder or built-in name) with a reducer or a stacked spec such as
    "vtc-cls:keep=128+fastv"; `keep` is the last stage's budget. Returns a `Pipeline` (see docs/reducers.md)."""
    from tokenomy.vlm.pipeline import load as _load

    return _load(model, reducer=reducer, device=device, dtype=dtype, position_policy=position_policy, keep=keep,
                 **reducer_options)


def __getattr__(name):
    # Most subpackages import torch (2-5 s); importing them on first use keeps `import tokenomy` fast while
    # `tokenomy.reducers.available()` works in a fresh interpreter, as the README shows.
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {info.name for info in pkgutil.iter_modules(__path__)})
