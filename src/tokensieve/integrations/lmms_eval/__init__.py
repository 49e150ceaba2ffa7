"""tokensieve in lmms-eval: a model plugin and the embedded scene-QA benchmark as a task.

The model is registered through lmms-eval's ``lmms_eval.models`` entry point group (see
``pyproject.toml``), so with tokensieve installed beside lmms-eval::

    python -m lmms_eval --model tokensieve \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=divprune,keep=64 \\
        --tasks mme --batch_size 8 --output_path results/

runs any model ``tokensieve.apply`` supports with any method (``pretrained=tiny``, the
default, is the embedded tiny VLM). The embedded benchmark ships as the tasks
``tokensieve_scene_qa`` (the 2,000-sample test split) and ``tokensieve_scene_qa_mini``
(its first 280 samples); their folder (:func:`tasks_dir`, printed by
``python -m tokensieve.integrations.lmms_eval``) goes to ``--include_path``.

Nothing here imports lmms-eval at import time: tokensieve does not depend on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The name ``--model`` takes.
MODEL_NAME = "tokensieve"
#: The tasks shipped in :func:`tasks_dir`.
TASK_NAMES = ("tokensieve_scene_qa", "tokensieve_scene_qa_mini")


def tasks_dir() -> Path:
    """The folder of tokensieve's lmms-eval task configs (pass it to ``--include_path``)."""
    return Path(__file__).resolve().parent / "tasks"


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: lmms-eval's ``ModelManifest`` for ``tokensieve``.

    Called by lmms-eval when it builds its model registry (lmms-eval >= 0.7).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_NAME,
        simple_class_path="tokensieve.integrations.lmms_eval.model.TokenSieveLMM",
    )


__all__ = ["MODEL_NAME", "TASK_NAMES", "manifest", "tasks_dir"]
