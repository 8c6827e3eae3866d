"""vLLM's OpenAI-compatible server with crop's plugin, on a loopback port, asked through the `openai` client: the
pruned answers and usage equal crop's own; a request with a region off the grid is refused and the server keeps
serving; settings that cannot run before the LLM, or a budget above the image's tokens, are refused at start-up,
naming why."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest
from conftest import REGIONS, crop_answers

from crop.serving.vllm_llava import ARCHITECTURE

SETTINGS = {"method": "crop", "budget": 30}
STARTUP_S = 600


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(checkpoint, settings: dict, port: int, log) -> subprocess.Popen:
    overrides = json.dumps({"architectures": [ARCHITECTURE], "crop": settings})
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "1024", "--limit-mm-per-prompt", json.dumps({"image": 1}), "--hf-overrides", overrides,
        "--trust-request-mm-kwargs",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_healthy(server: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"the server was not ready within {STARTUP_S} s")


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(client: openai.OpenAI, model: str, sample, box) -> openai.types.chat.ChatCompletion:
    content = [{"type": "image_url", "image_url": {"url": data_url(sample.image)}},
               {"type": "text", "text": sample.question}]  # fmt: skip
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=4, temperature=0.0,
        extra_body={"mm_processor_kwargs": {"crop_region": box}},
    )  # fmt: skip


def test_the_openai_server_serves_pruned_answers(checkpoint, hf_model, samples, tmp_path):
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        server = serve(checkpoint, SETTINGS, port, log)
        try:
            wait_healthy(server, port)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
            expected = crop_answers(hf_model, samples, SETTINGS)
            _, processor = hf_model
            for sample, box, (tokens, prompt_tokens) in zip(samples, REGIONS, expected, strict=True):
                reply = ask(client, str(checkpoint), sample, box)
                words = processor.decode(tokens, skip_special_tokens=True).split()  # word-level: spacing is vLLM's
                assert reply.choices[0].message.content.split() == words
                assert reply.usage.prompt_tokens == prompt_tokens
            with pytest.raises(openai.BadRequestError, match="grid"):
                ask(client, str(checkpoint), samples[0], [2, 2, 9, 5])
            assert ask(client, str(checkpoint), samples[1], REGIONS[1]).usage.prompt_tokens == expected[1][1]
        finally:
            server.terminate()
            server.wait(60)


@pytest.mark.parametrize(
    ("settings", "says"),
    [({"method": "fastv", "budget": 30}, "prunes inside the LLM"), ({"method": "pool", "budget": 300}, "budget")],
)
def test_bad_settings_are_refused_at_start_up(checkpoint, tmp_path, settings, says):
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        server = serve(checkpoint, settings, port, log)
        try:
            server.wait(STARTUP_S)
        finally:
            server.kill()
    assert server.returncode != 0
    assert says in (tmp_path / "server.log").read_text()
