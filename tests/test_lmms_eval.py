"""tokensieve in lmms-eval: the plugin answers the embedded scene QA like ``tokensieve.zoo``.

Needs lmms-eval (skipped without it): CI runs this file with the python of
``scripts/setup_lmms_eval_env.sh``. lmms-eval can exit 0 after an internal failure, so the
command-line runs are judged by their results and samples files, not their exit codes.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed "
                    "(scripts/setup_lmms_eval_env.sh builds an environment with it)")

import tokensieve as ts  # noqa: E402
from tokensieve.integrations.lmms_eval import tasks_dir  # noqa: E402
from tokensieve.zoo import accuracy_by_family, answer, load_tiny_vlm, scene_qa  # noqa: E402

N = 20
TASK = "tokensieve_scene_qa_mini"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True, scope="module")
def _offline() -> Any:
    old = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def samples() -> list:
    return scene_qa("test", N)


@pytest.fixture(scope="module")
def zoo_answers(samples: list) -> dict[str, list[str]]:
    """``tokensieve.zoo.answer`` on the first N test samples: untouched and divprune-64."""
    model, processor = load_tiny_vlm()
    out = {"plain": answer(model, processor, samples)}
    with ts.applied(model, "divprune", keep=64):
        out["divprune"] = answer(model, processor, samples)
    return out


@pytest.fixture(scope="module")
def task_manager() -> Any:
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir()), include_defaults=False)


def _by_doc(records: list[dict[str, Any]]) -> dict[int, str]:
    """doc_id -> the model's answer, from lmms-eval sample records (in-process or jsonl)."""
    out = {}
    for r in records:
        resp = r["filtered_resps"]
        while isinstance(resp, list):
            resp = resp[0]
        out[int(r["doc_id"])] = resp
    return out


def _evaluate(model_args: str, task_manager: Any) -> dict[str, Any]:
    from lmms_eval.evaluator import simple_evaluate

    return simple_evaluate(model="tokensieve", model_args=model_args, tasks=[TASK], limit=N,
                           batch_size=8, log_samples=True, task_manager=task_manager)


def test_entry_point_registers_the_model() -> None:
    from lmms_eval.models import get_model

    from tokensieve.integrations.lmms_eval.model import TokenSieveLMM

    assert get_model("tokensieve") is TokenSieveLMM


@pytest.mark.parametrize("variant,model_args", [
    ("plain", "pretrained=tiny"),
    ("divprune", "pretrained=tiny,method=divprune,keep=64"),
])
def test_in_process_equals_zoo_answer(variant: str, model_args: str, samples: list,
                                      zoo_answers: dict[str, list[str]],
                                      task_manager: Any) -> None:
    results = _evaluate(model_args, task_manager)
    got = _by_doc(results["samples"][TASK])
    assert sorted(got) == list(range(N))
    want = zoo_answers[variant]
    assert [got[i] for i in range(N)] == want
    metrics = results["results"][TASK]
    acc = accuracy_by_family(samples, want)
    for family, value in acc.items():
        assert metrics[f"{family},none"] == pytest.approx(value), family


def test_refusals_name_what_is_supported() -> None:
    from tokensieve.integrations.lmms_eval.model import TokenSieveLMM

    lm = TokenSieveLMM(pretrained="tiny")
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.loglikelihood([])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])
    with pytest.raises(ValueError, match="without a method"):
        TokenSieveLMM(pretrained="tiny", keep=64)


# -- the command line ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(out: Path, model_args: str, processes: int = 1) -> dict[str, Any]:
    """Run ``python -m lmms_eval --model tokensieve`` (under torchrun when processes > 1) and
    return its results file with the samples by doc id (exit codes are not trusted)."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                     "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    cmd = [*launcher, "-m", "lmms_eval", "--model", "tokensieve", "--model_args", model_args,
           "--tasks", TASK, "--include_path", str(tasks_dir()), "--limit", str(N),
           "--batch_size", "8", "--output_path", str(out), "--log_samples"]
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = (proc.stdout + proc.stderr)[-4000:]
    results = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    sample_files = glob.glob(str(out / "**" / f"*_samples_{TASK}.jsonl"), recursive=True)
    assert len(results) == 1 and len(sample_files) == 1, f"no results written:\n{log}"
    data = json.loads(Path(results[0]).read_text())
    with open(sample_files[0]) as f:
        data["by_doc"] = _by_doc([json.loads(line) for line in f if line.strip()])
    return data


@pytest.fixture(scope="module")
def cli_one(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _cli(tmp_path_factory.mktemp("lmms1"), "pretrained=tiny,method=divprune,keep=64")


def test_cli_through_the_plugin_name(cli_one: dict[str, Any], samples: list,
                                     zoo_answers: dict[str, list[str]]) -> None:
    assert cli_one["n-samples"][TASK]["effective"] == N
    assert [cli_one["by_doc"][i] for i in range(N)] == zoo_answers["divprune"]
    acc = accuracy_by_family(samples, zoo_answers["divprune"])
    assert cli_one["results"][TASK]["overall,none"] == pytest.approx(acc["overall"])


def test_two_processes_equal_one(cli_one: dict[str, Any],
                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    two = _cli(tmp_path_factory.mktemp("lmms2"), "pretrained=tiny,method=divprune,keep=64",
               processes=2)
    assert two["n-samples"][TASK]["effective"] == N
    assert two["by_doc"] == cli_one["by_doc"]
    for key, value in cli_one["results"][TASK].items():   # scores; stderrs up to rounding
        if isinstance(value, float):
            assert two["results"][TASK][key] == pytest.approx(value), key
