"""Every fenced example in README.md and docs/*.md runs, and prints something.

A user's first contact with tokenomy is copying an example; an example that raises or shows nothing is a bug.
Each ```python block runs as a script, each ```bash / ```sh block through bash (-e, -o pipefail), and the `$ `
lines of each ```console block through bash, in a fresh temporary folder with this checkout first on PYTHONPATH and
the interpreter's bin folder (python, tokenomy) first on PATH. A block fails if it exits non-zero or prints nothing.

An HTML comment on one line just before a block (invisible on GitHub) says what a block needs:

    <!-- docs-test: skip reason="needs a real LLaVA-1.5 checkpoint on disk" -->    reported as a pytest skip
    <!-- docs-test: setup="python make_inputs.py" -->    bash command run in the block's folder first
    <!-- docs-test: expect="256 -> 64" -->    text that must appear in what the block prints (repeatable)

Keys combine in one comment. Blocks in other languages (text, json, ...) are not run; a fence without a language
fails, so that a new shell example cannot escape by accident. New files under docs/ are picked up by the glob.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash", "console": "console"}
NOT_RUN = {"text", "json", "jsonl", "yaml", "toml", "ini", "diff", "markdown", "md", "csv", "html", "mermaid"}
MARKER = re.compile(r"^\s*<!--\s*docs-test:(.*?)-->\s*$")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
MARKER_KEYS = {"skip", "reason", "setup", "expect"}
# A hung example must not hang the suite; this is a guard, not a speed requirement.
BLOCK_TIMEOUT_S = 900


@dataclass
class Block:
    source: str  # "README.md:12", the line of the opening fence
    language: str  # as written after the fence, "" when none
    code: str
    marker: dict = field(default_factory=dict)


def parse_marker(text: str, where: str) -> dict:
    options = {}
    for word in shlex.split(text):
        key, _, value = word.partition("=")
        if key not in MARKER_KEYS:
            raise ValueError(f"{where}: unknown docs-test key {key!r}; known: {sorted(MARKER_KEYS)}")
        if key == "expect":
            options.setdefault("expect", []).append(value)
        else:
            options[key] = value
    if "skip" in options and not options.get("reason"):
        raise ValueError(f'{where}: a docs-test skip must say why: skip reason="..."')
    return options


def extract_blocks(text: str, name: str) -> list:
    blocks, lines, index = [], text.splitlines(), 0
    pending = None  # (marker options, line number) waiting for the block it annotates
    while index < len(lines):
        line = lines[index]
        marker, fence = MARKER.match(line), FENCE.match(line)
        if not marker and line.lstrip().startswith("<!--") and "docs-test" in line:
            raise ValueError(f"{name}:{index + 1}: malformed marker; write <!-- docs-test: key=\"value\" ... --> on one line")
        if marker:
            pending = (parse_marker(marker.group(1), f"{name}:{index + 1}"), index + 1)
        elif fence:
            indent, ticks, language = fence.groups()
            body, index = [], index + 1
            while index < len(lines) and not lines[index].strip().startswith(ticks):
                body.append(lines[index][len(indent):] if lines[index].startswith(indent) else lines[index])
                index += 1
            start = index - len(body)
            blocks.append(Block(f"{name}:{start}", language.lower(), "\n".join(body) + "\n", pending[0] if pending else {}))
            pending = None
        elif line.strip() and pending:
            raise ValueError(f"{name}:{pending[1]}: a docs-test marker must be followed by a code block")
        index += 1
    if pending:
        raise ValueError(f"{name}:{pending[1]}: a docs-test marker must be followed by a code block")
    return blocks


def doc_files() -> list:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_blocks() -> list:
    return [block for path in doc_files() for block in extract_blocks(path.read_text(), str(path.relative_to(ROOT)))]


def console_commands(code: str) -> str:
    """The `$ ` lines of a console transcript (and their backslash continuations); the rest is shown output."""
    commands, continuing = [], False
    for line in code.splitlines():
        if continuing or line.startswith("$ "):
            commands.append(line if continuing else line[2:])
            continuing = line.endswith("\\")
    return "\n".join(commands) + "\n"


def example_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # An example that would reach for a model hub fails at once instead of waiting on the network.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    return env


def _run(command: list, workdir: Path, env: dict):
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)


def run_block(block: Block, workdir: Path):
    """None when the block ran, printed something and printed what its marker expects; else what went wrong."""
    kind = LANGUAGES[block.language]
    env = example_env()
    if "setup" in block.marker:
        setup = _run(["bash", "-e", "-o", "pipefail", "-c", block.marker["setup"]], workdir, env)
        if setup.returncode:
            return f"{block.source}: setup {block.marker['setup']!r} failed ({setup.returncode}):\n{setup.stderr[-3000:]}"
    if kind == "python":
        script = workdir / "example.py"
        script.write_text(block.code)
        command = [sys.executable, str(script)]
    else:
        script = workdir / "example.sh"
        script.write_text(console_commands(block.code) if kind == "console" else block.code)
        command = ["bash", "-e", "-o", "pipefail", str(script)]
    done = _run(command, workdir, env)
    shown = f"--- example ---\n{block.code}--- stdout ---\n{done.stdout[-3000:]}--- stderr ---\n{done.stderr[-3000:]}"
    if done.returncode:
        return f"{block.source}: the example exited with {done.returncode}\n{shown}"
    if not done.stdout.strip():
        return f"{block.source}: the example printed nothing; an example should show its result\n{shown}"
    missing = [text for text in block.marker.get("expect", []) if text not in done.stdout]
    if missing:
        return f"{block.source}: the example's output lacks {missing}\n{shown}"
    return None


# Blocks in a language that is not run (text, json, ...) are left out rather than reported as skips.
DOC_BLOCKS = [block for block in all_blocks() if block.language not in NOT_RUN]


@pytest.mark.parametrize("block", DOC_BLOCKS, ids=[block.source for block in DOC_BLOCKS])
def test_doc_example(block, tmp_path):
    if not block.language:
        pytest.fail(f"{block.source}: a fence without a language; write ```bash, ```python or ```text")
    assert block.language in LANGUAGES, f"{block.source}: unknown fence language {block.language!r}; runnable: {sorted(LANGUAGES)}, not run: {sorted(NOT_RUN)}"
    if "skip" in block.marker:
        pytest.skip(f"{block.source}: {block.marker['reason']}")
    problem = run_block(block, tmp_path)
    assert problem is None, problem


# The checker itself: it must catch the failures it exists for.


def _block(language, code, expect=(), **marker):
    return Block("example.md:1", language, code, {**marker, **({"expect": list(expect)} if expect else {})})


def test_checker_catches_a_raising_a_silent_and_a_wrong_example(tmp_path):
    assert "exited with 1" in run_block(_block("python", "raise RuntimeError('broken')\n"), tmp_path)
    assert "printed nothing" in run_block(_block("python", "x = 1\n"), tmp_path)
    assert "printed nothing" in run_block(_block("bash", "true\n"), tmp_path)
    assert "exited with 3" in run_block(_block("bash", "echo partial\n(exit 3)\necho never\n"), tmp_path)
    assert "lacks ['two']" in run_block(_block("python", "print('one three')\n", expect=["one", "two"]), tmp_path)
    assert run_block(_block("python", "print('one two')\n", expect=["one", "two"]), tmp_path) is None


def test_checker_runs_console_commands_setup_and_this_checkout(tmp_path):
    console = "$ cat note.txt\nthis line is output, not a command\n$ python -c \\\n  'import tokenomy; print(tokenomy.__file__)'\n"
    assert console_commands(console) == "cat note.txt\npython -c \\\n  'import tokenomy; print(tokenomy.__file__)'\n"
    assert run_block(_block("console", console, setup="echo hello > note.txt"), tmp_path) is None
    assert "setup 'false' failed" in run_block(_block("bash", "echo hi\n", setup="false"), tmp_path)
    where = subprocess.run([sys.executable, "-c", "import tokenomy; print(tokenomy.__file__)"], cwd=tmp_path,
                           env=example_env(), capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where) == ROOT / "tokenomy" / "__init__.py"


def test_markers_annotate_the_next_block_and_refuse_mistakes():
    text = (
        '<!-- docs-test: skip reason="needs a GPU" -->\n```bash\nnvidia-smi\n```\n\n'
        "    ```python\n    print(1)\n    ```\n```\nno language\n```\n"
    )
    skipped, indented, bare = extract_blocks(text, "x.md")
    assert (skipped.source, skipped.language, skipped.code, skipped.marker) == ("x.md:2", "bash", "nvidia-smi\n", {"skip": "", "reason": "needs a GPU"})
    assert (indented.language, indented.code, indented.marker) == ("python", "print(1)\n", {})
    assert bare.language == ""
    (checked,) = extract_blocks('<!-- docs-test: expect="a b" expect=c -->\n```bash\necho a b c\n```\n', "x.md")
    assert checked.marker == {"expect": ["a b", "c"]}
    with pytest.raises(ValueError, match="must say why"):
        extract_blocks("<!-- docs-test: skip -->\n```bash\nx\n```\n", "x.md")
    with pytest.raises(ValueError, match="unknown docs-test key 'skp'"):
        extract_blocks('<!-- docs-test: skp reason="x" -->\n```bash\nx\n```\n', "x.md")
    with pytest.raises(ValueError, match="malformed marker"):
        extract_blocks('<!-- docs-test skip reason="x" -->\n```bash\nx\n```\n', "x.md")
    with pytest.raises(ValueError, match="followed by a code block"):
        extract_blocks('<!-- docs-test: skip reason="x" -->\nprose\n```bash\nx\n```\n', "x.md")


def test_import_tokenomy_gives_the_documented_surface_lazily():
    code = (
        "import sys, tokenomy\n"
        "assert 'torch' not in sys.modules, 'import tokenomy imported torch'\n"
        "print(tokenomy.reducers.available(), tokenomy.errors.InputError.__name__, tokenomy.load.__name__)\n"
        "assert 'reducers' in dir(tokenomy) and 'eval' in dir(tokenomy)\n"
        "try:\n    tokenomy.no_such_thing\nexcept AttributeError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=example_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "'none'" in done.stdout and "InputError load" in done.stdout
    assert "has no attribute 'no_such_thing'" in done.stdout
