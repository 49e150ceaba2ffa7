"""The lmms-eval task class of the embedded scene-QA benchmark (imports lmms-eval)."""

from __future__ import annotations

from typing import Any

from lmms_eval.api.task import ConfigurableTask

from tokensieve.integrations.lmms_eval.scene_qa import SIZES, task_config


class SceneQATask(ConfigurableTask):
    """``tokensieve_scene_qa`` / ``tokensieve_scene_qa_mini``: the embedded benchmark.

    The task's YAML holds ``task``, ``class`` and optionally ``samples``; the data set
    is written locally on first use (:func:`~tokensieve.integrations.lmms_eval.scene_qa.
    write_dataset`) and read with the ``parquet`` builder, offline.
    """

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        config = dict(config or {})
        name = str(config.get("task") or "tokensieve_scene_qa")
        n = int(config.get("samples") or SIZES.get(name, SIZES["tokensieve_scene_qa"]))
        # a local parquet file read by the packaged parquet builder: no hub access
        super().__init__(config=task_config(name, n), **kwargs)
