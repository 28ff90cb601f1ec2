"""Real pretrained checkpoints through the extraction stage: SmolLM2-135M-Instruct (chat, vocabulary 49,152) and
Gemma-3-270m (base, vocabulary 262,144), each given as its .gguf file, against a LoRA adapter over it given as a PEFT
adapter folder. The stored diffs and per-token KL equal a direct recomputation with transformers (the GGUF loaded by
transformers itself, the adapter applied unmerged by PEFT), and the manifest names the models by content."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from diffsae.config import PipelineConfig
from diffsae.fingerprint import file_sha256
from storage.paths import RunPaths

peft = pytest.importorskip("peft")

CHECKPOINTS = {  # name: (locator, middle layer, chat documents?)
    "smollm2": ("smollm2_gguf", 15, True),
    "gemma3": ("gemma3_gguf", 9, False),
}
QUESTIONS = ["What is the capital of France?", "Tell me a joke about cats.", "How do I boil an egg?",
             "Name three colours.", "Why is the sky blue?", "Write a haiku about rain."]  # fmt: skip


def _adapter(base_folder: str, recorded: str, out: Path) -> Path:
    """A LoRA (r=8, q/v projections) with small random A and B: a real, modest change of every layer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_folder)
    lcfg = peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(model, lcfg)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    lora.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": recorded}))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_gguf_base_and_lora_adapter_extract_as_transformers_computes(name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from diffsae import sources
    from diffsae.hooks import read_residual
    from diffsae.kl import kl_per_token
    from flows.stages import extract_flow
    from organisms import checkpoints

    locate, layer, chat = CHECKPOINTS[name]
    gguf = getattr(checkpoints, locate)()
    base_folder = str(sources.dequantized(sources.inspect(str(gguf), "base")))
    adapter = _adapter(base_folder, str(gguf), tmp_path / "adapter")
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i, q in enumerate(QUESTIONS):
            row = {"messages": [{"role": "user", "content": q}]} if chat else {"text": f"Question: {q}\nAnswer:"}
            f.write(json.dumps({"id": f"q{i}", **row}) + "\n")
    store = str(tmp_path / "store")
    cfg = {
        "run": "r",
        "store": store,
        "models": {"base": str(gguf), "finetuned": str(adapter), "layer": layer, "device": "cpu"},
        "data": {"path": str(tmp_path / "prompts.jsonl"), "max_tokens_per_doc": 48},
        "extract": {"dtype": "float32", "batch_tokens": 256},
    }
    out, states = extract_flow(config=PipelineConfig.from_dict(cfg))
    assert states["extract"] == {"Completed": 1}

    paths = RunPaths(store, "r")
    manifest = json.loads(Path(paths.activations_manifest).read_text())
    assert manifest["model_fingerprints"][0] == f"gguf-{file_sha256(gguf)}"
    rows = duckdb.sql(
        f"select token_id, kl, diff from read_parquet('{paths.url('activations')}/shard-*.parquet') "
        "where doc_id = 2 order by pos"
    ).fetchall()
    ids_1T = torch.tensor([[r[0] for r in rows]])

    base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    ft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()  # one GGUF load (minutes for Gemma)
    with torch.no_grad():
        with read_residual(base, layer) as cap_b:
            logits_b = base(ids_1T).logits
        with read_residual(ft.get_base_model(), layer) as cap_f:
            logits_f = ft(ids_1T).logits
    want_kl = kl_per_token(logits_f, logits_b)[0].numpy()
    want_diff = (cap_f.value - cap_b.value)[0].numpy()
    assert want_kl[1:].mean() > 1e-3  # the adapter changes predictions
    np.testing.assert_allclose([r[1] for r in rows], want_kl, rtol=1e-3, atol=1e-4)
    diff = np.array([r[2] for r in rows], dtype=np.float32)
    scale = np.abs(want_diff).max()
    np.testing.assert_allclose(diff, want_diff, atol=2e-4 * scale)
