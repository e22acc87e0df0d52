"""Gradio demos: `tokenomy demo vlm` (chat with a reducer) and `tokenomy demo gen` (generation playground).

Both need the `demo` extra (gradio); importing this package does not import gradio, so the command line and the rest
of tokenomy work without it.
"""
