"""The README's MoS walk-through as written: train and save an MoS adapter, export it with `llmgraft
export-lora`, serve it with vLLM's OpenAI server (`--enable-lora --lora-modules`), and check that vLLM's
greedy completions equal transformers' with the MoS adapter itself."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import urllib.request

import pytest
import torch
from conftest import ROOT
from readme_blocks import block, commands

from llmgraft.testing.server import openai_server

pytestmark = pytest.mark.slow

PROMPTS = ["def parse(line):\n    ", "import os\n\nclass ", "for item in items:\n    "]


def complete(base: str, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    request = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())["choices"][0]["text"]


def test_readme_mos_trains_exports_and_serves_like_transformers(tmp_path):
    def run(argv):
        result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{argv[:4]}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    out = run([sys.executable, "-c", block("mos").code])
    assert "trainable params: 40,960" in out and "reloaded as MoSModel" in out  # LoRA r=2's count
    export, server = commands(block("mos-serve").code)[:2]
    assert export == "llmgraft export-lora mos-adapter mos-lora"
    assert "exported 28 layers as a rank-8 LoRA" in run([sys.executable, "-m", "llmgraft.cli", *export.split()[1:]])
    argv = shlex.split(server.removesuffix("&").replace("./llmgraft/assets/code-lm", str(ROOT / "llmgraft/assets/code-lm")))
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"] and "--enable-lora" in argv

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmgraft.integrations.peft  # noqa: F401 - registers MoS with PEFT

    code_lm = ROOT / "llmgraft/assets/code-lm"
    tokenizer = AutoTokenizer.from_pretrained(str(code_lm))
    mos = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(code_lm), dtype=torch.float32),
                                    str(tmp_path / "mos-adapter")).eval()
    expected = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            generated = mos.generate(input_ids=ids, max_new_tokens=16, do_sample=False)
        expected.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    with openai_server([sys.executable, *argv[1:], "--enforce-eager"], tmp_path / "server.log", env, tmp_path) as (_, base):
        served = [complete(base, "mos", p) for p in PROMPTS]
        plain = [complete(base, "code-lm", p) for p in PROMPTS]
    assert served == expected
    assert served != plain, "the adapter changes nothing: is the LoRA applied?"
