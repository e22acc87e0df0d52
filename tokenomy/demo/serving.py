"""What both demos share: importing gradio with analytics off, and launching bound to one address with an upload cap."""
from __future__ import annotations

import os

from tokenomy.errors import InputError, TokenomyError

DEFAULT_HOST = "127.0.0.1"  # reachable from this machine only, unless the user asks for more with --host
DEFAULT_PORT = 7860
DEFAULT_MAX_FILE_SIZE = "20mb"


def import_gradio():
    """gradio, imported with analytics off: gradio reads the variable when it is imported and when a Blocks is built."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ModuleNotFoundError as exc:
        raise TokenomyError("the demos need gradio; install the demo extra: pip install 'tokenomy[demo]'") from exc
    return gradio


def parse_file_size(text) -> int:
    """'20mb', '512kb', '1gb' or a number of bytes -> bytes; the cap gradio enforces on every upload."""
    units = {"gb": 1024**3, "mb": 1024**2, "kb": 1024, "b": 1}
    value = str(text).strip().lower()
    for unit, factor in units.items():
        if value.endswith(unit):
            number = value[: -len(unit)].strip()
            break
    else:
        number, factor = value, 1
    try:
        size = float(number) * factor
    except ValueError:
        raise InputError(f"--max-file-size {text!r} is not a size such as 20mb, 512kb or 1000000") from None
    if size < 1:
        raise InputError(f"--max-file-size must be at least 1 byte, got {text!r}")
    return int(size)


def launch(app, host: str = DEFAULT_HOST, port: int | None = DEFAULT_PORT, max_file_size=DEFAULT_MAX_FILE_SIZE,
           block: bool = True) -> str:
    """Serve `app` on host:port with uploads capped at `max_file_size`; returns the local URL (when block=False)."""
    app.queue(default_concurrency_limit=1)  # one model run at a time: a CPU or a single GPU serves one request well
    _, url, _ = app.launch(
        server_name=host, server_port=port, max_file_size=parse_file_size(max_file_size), prevent_thread_lock=not block,
        quiet=not block, show_error=False, share=False,
    )
    return url
