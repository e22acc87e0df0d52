"""Serving a demo inside a test: on 127.0.0.1, a free port, and a bounded wait until it answers.

The wait polls the page with a deadline and fails with what the server printed; it never asserts how long starting took.
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STARTUP_DEADLINE_S = 240  # a guard against a server that never comes up, not a speed requirement


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_until_serving(url: str, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while not answers(url):
        if process is not None and process.poll() is not None:
            pytest.fail(f"the demo server exited with {process.returncode}:\n{log.read_text() if log else ''}")
        if time.monotonic() > deadline:
            printed = log.read_text() if log else ""
            pytest.fail(f"the demo server at {url} did not answer within {STARTUP_DEADLINE_S} s:\n{printed}")
        time.sleep(0.5)


@contextmanager
def serving_in_thread(app, max_file_size="2mb"):
    from tokenomy.demo.serving import launch

    url = launch(app, port=free_port(), max_file_size=max_file_size, block=False)
    try:
        wait_until_serving(url)
        yield url
    finally:
        app.close()


@contextmanager
def serving_cli(args: list, log: Path):
    """`tokenomy demo ...` in a subprocess (this checkout first on the path); yields (url, process)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "tokenomy.cli", "demo", *args, "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, log)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A few-byte PNG whose header claims width x height pixels: a decompression bomb to any reader that trusts it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
    return path
