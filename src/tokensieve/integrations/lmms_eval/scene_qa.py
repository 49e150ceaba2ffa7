"""The embedded scene-QA benchmark as a local data set for lmms-eval, and its scoring.

:func:`write_dataset` writes the first ``n`` samples of ``tokensieve.zoo.scene_qa("test")``
into a cache folder (``$TOKENSIEVE_CACHE``, default ``~/.cache/tokensieve``) as one
parquet file with lossless PNG images, once: the folder is keyed by ``n`` and a
fingerprint of the generated samples, so a change to the generator writes a new one.
lmms-eval then reads it with the local ``parquet`` builder (no hub access).

Scoring is the zoo's: exact match of the answer's first word
(:func:`tokensieve.zoo.is_correct`), accuracy per question family and overall, the
numbers of :func:`tokensieve.zoo.accuracy_by_family`.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokensieve.zoo import FAMILIES, Sample, is_correct, scene_qa

#: Samples of each shipped task: the whole test split, and the bench's default 280.
SIZES = {"tokensieve_scene_qa": 2000, "tokensieve_scene_qa_mini": 280}
#: Bumped when the file layout changes.
DATA_VERSION = 1
#: Metric names: one accuracy per question family, then the overall one.
METRICS = (*FAMILIES, "overall")


def cache_root() -> Path:
    """``$TOKENSIEVE_CACHE`` or ``~/.cache/tokensieve``."""
    root = os.environ.get("TOKENSIEVE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "tokensieve"


def _png(sample: Sample) -> bytes:
    buf = io.BytesIO()
    sample.image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _fingerprint(n: int) -> str:
    """A short digest of the first and last samples (questions, answers and pixels)."""
    h = hashlib.sha256(f"v{DATA_VERSION}:{n}".encode())
    for i in sorted({0, max(0, n - 1)}):
        s = scene_qa("test", 1, start=i)[0]
        h.update(f"{s.question}|{s.answer}|{s.family}".encode())
        h.update(s.image.tobytes())
    return h.hexdigest()[:12]


def dataset_path(n: int) -> Path:
    """Where :func:`write_dataset` puts the parquet file of the first ``n`` test samples."""
    return cache_root() / "lmms_eval" / f"scene_qa-test-{n}-{_fingerprint(n)}" / "test.parquet"


def write_dataset(n: int, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the first ``n`` test samples as parquet (columns ``doc_id``, ``image``,
    ``question``, ``answer``, ``family``) unless already there; return the file.

    Safe when several processes of one run call it at once (each writes a temporary
    file and renames it into place). Needs the ``datasets`` package (an lmms-eval
    dependency).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    path = dataset_path(n)
    if path.is_file():
        return path
    from datasets import Dataset, Features, Image, Value

    rows: dict[str, list[Any]] = {k: [] for k in ("doc_id", "image", "question", "answer",
                                                  "family")}
    step = 100
    for start in range(0, n, step):
        for j, s in enumerate(scene_qa("test", min(step, n - start), start=start)):
            rows["doc_id"].append(start + j)
            rows["image"].append({"bytes": _png(s), "path": None})
            rows["question"].append(s.question)
            rows["answer"].append(s.answer)
            rows["family"].append(s.family)
        if progress is not None:
            progress(min(start + step, n), n)
    features = Features({"doc_id": Value("int64"), "image": Image(), "question": Value("string"),
                         "answer": Value("string"), "family": Value("string")})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Dataset.from_dict(rows, features=features).to_parquet(str(tmp))
    os.replace(tmp, path)
    return path


# -- the task's hooks (plain functions of a data set row) ---------------------------------
def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The row's image, as a one-element list of PIL images (RGB)."""
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None
                ) -> str:
    """The question itself (the model's chat template adds the image and the roles)."""
    return str(doc["question"])


def doc_to_target(doc: dict[str, Any]) -> str:
    """The one-word answer."""
    return str(doc["answer"])


def process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, Any]:
    """Per metric: ``{"family", "correct"}`` for the family metrics, the hit for overall."""
    hit = is_correct(results[0] if results else "",
                     Sample(image=None, question=doc["question"], answer=doc["answer"],
                            family=doc["family"]))
    out: dict[str, Any] = {f: {"family": doc["family"], "correct": hit} for f in FAMILIES}
    out["overall"] = float(hit)
    return out


def _family_accuracy(family: str) -> Callable[[Sequence[dict[str, Any]]], float]:
    def aggregate(items: Sequence[dict[str, Any]]) -> float:
        hits = [bool(it["correct"]) for it in items if it["family"] == family]
        return sum(hits) / len(hits) if hits else float("nan")

    aggregate.__name__ = f"{family}_accuracy"
    aggregate.__qualname__ = aggregate.__name__
    aggregate.__doc__ = f"Accuracy over the samples of family {family!r} (nan when none)."
    return aggregate


def overall_accuracy(items: Sequence[float]) -> float:
    """Mean of the per-sample hits."""
    return sum(items) / len(items) if items else float("nan")


#: Aggregation function per metric.
AGGREGATIONS: dict[str, Callable[..., float]] = {
    **{f: _family_accuracy(f) for f in FAMILIES}, "overall": overall_accuracy}


def task_config(task: str, n: int) -> dict[str, Any]:
    """The lmms-eval task config (a ``TaskConfig`` dict) over :func:`write_dataset` ``(n)``."""
    path = write_dataset(n)
    return {
        "task": task,
        "dataset_path": "parquet",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_visual": doc_to_visual,
        "doc_to_text": doc_to_text,
        "doc_to_target": doc_to_target,
        "process_results": process_results,
        "metric_list": [{"metric": m, "aggregation": AGGREGATIONS[m], "higher_is_better": True}
                        for m in METRICS],
        "generation_kwargs": {"max_new_tokens": 3, "do_sample": False, "temperature": 0.0,
                              "until": ["\n\n"]},
        "metadata": {"version": float(DATA_VERSION), "samples": n, "data_files": str(path)},
    }
