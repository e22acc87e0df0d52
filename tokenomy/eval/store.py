"""The files of one evaluation run, written so that a SIGKILL at any moment loses nothing and duplicates nothing.

Layout under `<output_path>/<model>/`:
  <stamp>_results.json                 rewritten atomically (temp file + rename) after every task x reducer x keep
  <stamp>_samples_<task>.jsonl         finished sample records (kept at the end with --log_samples)
  <stamp>_samples_<task>.rank<r>.part  a rank's journal of the combination in progress

Records are appended one chunk of samples at a time with a single write + fsync. Each record names its chunk
(`chunk_start`, `chunk_len`); on resume a chunk counts only when all of its records are present, so a chunk cut
by a kill, or a half-written last line, is dropped and re-run, and records seen twice are deduplicated by key.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from tokenomy.errors import InputError

RESULTS_SUFFIX = "_results.json"


def record_key(record: dict) -> tuple:
    return record["reducer"], record["keep"], record["doc_index"]


def _chunk_key(record: dict) -> tuple:
    return record["reducer"], record["keep"], record["chunk_start"]


def atomic_write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_results(path: Path) -> dict:
    """A `*_results.json` file, or an InputError naming it when it is not one (cut, hand-edited, another tool's)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read results file {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise InputError(f"{path} is not a tokenomy eval results file (no 'results' object)")
    return data


def read_json_lines(path: Path) -> list[dict]:
    """Parsable lines only: a line cut by a kill is the last one and is simply not there yet."""
    out = []
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


class RunStore:
    def __init__(self, folder: Path, stamp: str):
        self.folder = Path(folder)
        self.stamp = stamp
        self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_stamp(folder: Path) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        candidate, n = stamp, 1
        while (Path(folder) / f"{candidate}{RESULTS_SUFFIX}").exists():
            candidate, n = f"{stamp}-{n}", n + 1
        return candidate

    @staticmethod
    def incomplete_runs(folder: Path) -> list[tuple[str, dict]]:
        """(stamp, results) of every run in `folder` that did not finish, newest first (unreadable files skipped)."""
        found = []
        for path in sorted(Path(folder).glob(f"*{RESULTS_SUFFIX}"), reverse=True):
            try:
                data = read_results(path)
            except InputError as exc:
                print(f"tokenomy eval: not a run to resume: {exc}", file=sys.stderr)
                continue
            if not data.get("complete", False):
                found.append((path.name[: -len(RESULTS_SUFFIX)], data))
        return found

    def has_samples(self) -> bool:
        """Whether any sample record of this run reached the disk (journals included)."""
        return any(self.folder.glob(f"{self.stamp}_samples_*"))

    @property
    def results_path(self) -> Path:
        return self.folder / f"{self.stamp}{RESULTS_SUFFIX}"

    def samples_path(self, task: str) -> Path:
        return self.folder / f"{self.stamp}_samples_{task}.jsonl"

    def part_path(self, task: str, rank: int) -> Path:
        return self.folder / f"{self.stamp}_samples_{task}.rank{rank}.part"

    def write_results(self, results: dict) -> None:
        atomic_write_json(self.results_path, results)

    @staticmethod
    def _append(path: Path, records: list[dict]) -> None:
        if not records:
            return
        payload = "".join(json.dumps(r, default=str) + "\n" for r in records)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())

    def journal(self, task: str, rank: int, records: list[dict]) -> None:
        self._append(self.part_path(task, rank), records)

    def commit(self, task: str, records: list[dict]) -> None:
        """Rank 0: move gathered records into the samples file."""
        self._append(self.samples_path(task), records)

    def clear_journal(self, task: str, rank: int) -> None:
        self.part_path(task, rank).unlink(missing_ok=True)

    def finished_records(self, task: str) -> list[dict]:
        """Records of complete chunks from the samples file and any journals, each key once."""
        lines = read_json_lines(self.samples_path(task))
        for part in sorted(self.folder.glob(f"{self.stamp}_samples_{task}.rank*.part")):
            lines += read_json_lines(part)
        unique, seen = [], set()
        for r in lines:
            if record_key(r) not in seen:
                seen.add(record_key(r))
                unique.append(r)
        present = Counter(_chunk_key(r) for r in unique)
        return [r for r in unique if present[_chunk_key(r)] == r["chunk_len"]]

    def consolidate(self, task: str) -> list[dict]:
        """Rank 0 at (re)start: rewrite the samples file with exactly the finished records, remove journals."""
        records = self.finished_records(task)
        path = self.samples_path(task)
        if records or path.exists():
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r, default=str) + "\n" for r in records))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        for part in self.folder.glob(f"{self.stamp}_samples_{task}.rank*.part"):
            part.unlink()
        return records

    def remove_samples(self, task: str) -> None:
        self.samples_path(task).unlink(missing_ok=True)
