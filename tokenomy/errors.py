"""Errors raised by tokenomy. Each names the culprit so the user can fix the input."""


class TokenomyError(Exception):
    """Base class of every error tokenomy raises on purpose."""


class InputError(TokenomyError, ValueError):
    """A user input (image, prompt, argument) is unusable."""


class UnknownNameError(TokenomyError, KeyError):
    """A reducer, model or task name is not registered. The message lists the known names."""

    def __init__(self, kind: str, name: str, known):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known {kind}s: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class ModelLoadError(TokenomyError, OSError):
    """A local model folder or checkpoint cannot be loaded as a supported model."""


class ShapeError(TokenomyError, ValueError):
    """Tensors given to a kernel or reducer have incompatible shapes, dtypes or layouts."""
