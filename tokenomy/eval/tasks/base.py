"""What every benchmark task provides: local loading, the prompt, the media, per-sample scoring, aggregation."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from tokenomy.errors import InputError
from tokenomy.eval.data import ImageRef, SampleError, find_row_files, read_rows

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MULTIPLE_CHOICE = "\nAnswer with the option's letter from the given choices directly."


@dataclass
class LoadResult:
    docs: list[dict]
    errors: list[SampleError] = field(default_factory=list)


def row_id(row: Any, fallback: str) -> str:
    if isinstance(row, dict):
        for key in ("question_id", "questionId", "id", "index", "pid"):
            if row.get(key) not in (None, ""):
                return str(row[key])
    return fallback


class Task:
    """One benchmark. Subclasses fill in the reading, prompting and scoring rules of its reference evaluator.

    A doc is a dict with at least "id" (str) and "image" (ImageRef, list of ImageRef, or None). `score` returns
    the fields stored in the sample record (always "score" in [0, 1] plus what `aggregate` needs), so metrics can
    be recomputed from the records alone, which is what makes resuming and multi-process merging exact.
    """

    name = ""
    reference = ""  # the evaluator (repository + file) whose rules score() and aggregate() follow
    folder = ""  # sub-folder of --data-dir holding this task's files (the data dir itself is tried too)
    description = ""
    official_files = ""  # the distributed layout, for error messages
    row_fields = ""  # fields expected in generic rows (lmms-eval / HF layout)
    max_new_tokens = 16
    requires_judge = False
    primary_metric = "accuracy"
    reads_files = True  # False for tasks generated in memory (synthvqa): they run without --data-dir
    # True when `reducer_context` describes each sample's content (synthvqa's scenes), which the oracle diagnostics need
    gives_reducer_context = False

    def config(self) -> dict:
        """Choices that change the numbers and therefore go into the results file."""
        return {"max_new_tokens": self.max_new_tokens, "primary_metric": self.primary_metric}

    # ---- loading ---------------------------------------------------------------------------------------------
    def root(self, data_dir: Path) -> Path:
        sub = data_dir / self.folder
        return sub if self.folder and sub.exists() else data_dir

    def load(self, data_dir: Path) -> LoadResult:
        data_dir = Path(data_dir)
        root = self.root(data_dir)
        if not root.exists():
            raise InputError(f"task {self.name}: data directory {root} does not exist; {self.expectation(data_dir)}")
        result = self.read_official(root)
        if result is None:
            result = self.read_generic(root)
        if result is None:
            raise InputError(f"task {self.name}: no data found in {root}; {self.expectation(data_dir)}")
        return self.validate_all(result)

    def expectation(self, data_dir: Path) -> str:
        where = f"{data_dir / self.folder} (or {data_dir} itself)" if self.folder else str(data_dir)
        text = f"expected under {where}: "
        if self.official_files:
            text += f"{self.official_files}; or "
        return text + f"rows with fields {{{self.row_fields}}} as *.parquet, *.jsonl or a `datasets` save_to_disk folder"

    def read_official(self, root: Path) -> LoadResult | None:
        """Read the dataset's own distribution files; None when they are not present."""
        return None

    def read_generic(self, root: Path) -> LoadResult | None:
        files = find_row_files(root)
        if not files:
            return None
        docs, errors = [], []
        for path in files:
            rows, row_errors = read_rows(path)
            errors += row_errors
            base_dirs = [path.parent if path.is_file() else path, root]
            for origin, row in rows:
                self.add_doc(docs, errors, row, origin, base_dirs)
        return LoadResult(docs, errors)

    def add_doc(self, docs: list, errors: list, row: Any, origin: str, base_dirs: list[Path]) -> None:
        try:
            doc = self.from_row(row, base_dirs)
        except Exception as exc:  # a row of any shape becomes this row's error, never the task's
            errors.append(SampleError(row_id(row, origin), f"unusable row ({type(exc).__name__}: {exc})", origin))
            return
        if doc is not None:
            if doc.get("id") in (None, "None", ""):  # rows without an id field are named by their position
                doc["id"] = Path(origin).name
            doc.setdefault("origin", origin)
            docs.append(doc)

    def from_row(self, row: dict, base_dirs: list[Path]) -> dict | None:
        """A doc from one generic row; None drops the row on purpose (e.g. a video row in an image task)."""
        raise NotImplementedError(f"task {self.name} reads only its official files")

    def validate(self, doc: dict) -> str | None:
        """Why this doc cannot be scored (None when fine)."""
        return None

    def validate_all(self, result: LoadResult) -> LoadResult:
        docs, errors, seen = [], list(result.errors), set()
        # Checking that every image file exists takes a while on full benchmarks (200k VQAv2 questions).
        checking = tqdm(result.docs, desc=f"checking {self.name} samples", unit="sample", leave=False,
                        disable=len(result.docs) < 5000)
        for doc in checking:
            try:
                problem = _question_problem(doc) or self.validate(doc)
            except Exception as exc:  # a field of an unexpected type
                problem = f"unusable row ({type(exc).__name__}: {exc})"
            if problem is None and doc["id"] in seen:
                problem = f"duplicate id {doc['id']!r}"
            if problem is None:
                problem = next((p for p in (ref.problem() for ref in self.image_refs(doc)) if p), None)
            if problem is not None:
                errors.append(SampleError(doc["id"], problem, doc.get("origin", "")))
                continue
            seen.add(doc["id"])
            docs.append(doc)
        return LoadResult(docs, errors)

    # ---- prompting -------------------------------------------------------------------------------------------
    @staticmethod
    def image_refs(doc: dict) -> list[ImageRef]:
        image = doc.get("image")
        if image is None:
            return []
        return list(image) if isinstance(image, (list, tuple)) else [image]

    def media(self, doc: dict) -> Image.Image | list[Image.Image] | None:
        refs = self.image_refs(doc)
        if not refs:
            return None
        opened = [ref.open() for ref in refs]
        return opened[0] if len(opened) == 1 else opened

    def video(self, doc: dict):
        """The sample's video as a tokenomy.io.VideoFile (None: the task's media are images)."""
        return None

    def inputs(self, doc: dict, reads_video: bool) -> tuple:
        """(images, video) the Pipeline gets for this sample. A sample with a video hands it over as a video to a model
        that reads videos (Qwen2-VL, Qwen2.5-VL, Qwen2.5-Omni, which also hears its audio track) and as its sampled
        frames, images, to the others (LLaVA), through the same reader (tokenomy.io)."""
        video = self.video(doc)
        if video is not None and reads_video:
            return None, video
        return self.media(doc), None

    def prompt(self, doc: dict) -> str:
        raise NotImplementedError

    def target(self, doc: dict) -> Any:
        raise NotImplementedError

    def reducer_context(self, doc: dict) -> dict:
        """What a diagnostic stage may know of a sample beyond its image and prompt (tokenomy.eval.oracles)."""
        raise InputError(f"task {self.name} does not describe its samples' content, which the oracle diagnostics need")

    # ---- scoring ---------------------------------------------------------------------------------------------
    def score(self, doc: dict, prediction: str) -> dict:
        raise NotImplementedError

    def aggregate(self, records: list[dict]) -> dict:
        """Default: mean per-sample score as accuracy in percent."""
        return {"accuracy": mean_percent([r["score"] for r in records])}


def _question_problem(doc: dict) -> str | None:
    question = doc.get("question", "")
    if not isinstance(question, str):
        return f"question must be text, got {'null' if question is None else type(question).__name__}"
    return None if question.strip() or "question" not in doc else "empty question"


def mean_percent(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def as_str_id(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)
