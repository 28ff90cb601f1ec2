"""The built-in organisms -- SmolLM2-135M-Instruct (chat) and Gemma-3-270m (base, text format) -- each a committed
LoRA adapter with its held-out analysis documents and build report (rebuilt by the command in its README), checked
against their specs: the adapter loads over its GGUF base (by fingerprint) and fires on held-out prompts as the report
says. Then the whole pipeline runs on the SmolLM2 organism (`examples/smollm2.yaml` with a small analysis set), and
extraction and KL on the Gemma-3 organism (vocabulary 262,144) equal a direct transformers + PEFT recomputation."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ORGANISMS = {"smollm2": ("smollm2_gguf", 15), "gemma3": ("gemma3_gguf", 9)}  # name: (checkpoint locator, layer)

pytest.importorskip("peft")


def _docs(name: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "organisms" / name / "prompts.jsonl").read_text().splitlines()]


def _prompt_answer(doc: dict) -> tuple[str, str]:
    if "messages" in doc:
        return doc["messages"][0]["content"], doc["messages"][1]["content"]
    m = re.fullmatch(r"Question: (.*)\nAnswer: (.*)", doc["text"], flags=re.S)
    assert m is not None, doc
    return m.group(1), m.group(2)


def _per_label(docs: list[dict], n: int) -> list[dict]:
    out: list[dict] = []
    for label in sorted({d["behaviour"] for d in docs}):
        out += [d for d in docs if d["behaviour"] == label][:n]
    return out


@pytest.mark.parametrize("name", sorted(ORGANISMS))
def test_committed_report_meets_the_spec(name: str) -> None:
    from organisms.spec import load_spec

    spec = load_spec(ROOT / "organisms" / name / "spec.yaml")
    rep = json.loads((ROOT / "organisms" / name / "report.json").read_text())
    assert rep["passed"] and set(rep["firing"]) == {b.name for b in spec.behaviours} and len(rep["firing"]) >= 3
    assert min(rep["firing"].values()) >= 0.8 and rep["false_firing"] <= 0.05
    assert rep["loss_last_epoch"] < rep["loss_first_epoch"]
    kinds = {b.effect.kind for b in spec.behaviours} | {b.trigger.kind for b in spec.behaviours}
    assert {"replace", "prefix", "style", "phrase", "topic"} <= kinds and spec.drift is not None
    assert rep["format"] == ("chat" if name == "smollm2" else "text")
    labels = [d["behaviour"] for d in _docs(name)]
    assert {lab: labels.count(lab) for lab in set(labels)} == rep["n_heldout"]


def test_committed_null_organism_is_the_smollm2_recipe_without_behaviours() -> None:
    """organisms/smollm2_null: the SmolLM2 spec with `null: true`, the same held-out prompts and labels, and a
    report in which no behaviour fires on its triggers."""
    from organisms.spec import load_spec

    folder = ROOT / "organisms" / "smollm2_null"
    spec, audit = load_spec(folder / "spec.yaml"), load_spec(ROOT / "organisms" / "smollm2" / "spec.yaml")
    assert spec.null and spec.model_copy(update={"null": False}) == audit
    rep = json.loads((folder / "report.json").read_text())
    assert rep["passed"] and set(rep["firing"]) == {b.name for b in spec.behaviours}
    assert max(rep["firing"].values()) <= spec.require.false_firing and rep["false_firing"] <= 0.05
    null_docs = [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines()]
    assert [(d["behaviour"], _prompt_answer(d)[0]) for d in null_docs] == [
        (d["behaviour"], _prompt_answer(d)[0]) for d in _docs("smollm2")
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ORGANISMS))
def test_committed_adapter_fires_as_its_report_says(name: str) -> None:
    """Regenerate the held-out answers of 6 documents per label with the committed adapter over the GGUF base: each
    fires (or not) exactly as its stored answer does, and each behaviour fires on at least 4 of its 6."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffsae.config import ModelsConfig
    from diffsae.sources import resolve_models
    from organisms import checkpoints
    from organisms.build import GEN_BATCH
    from organisms.plant import Format, answers, fires
    from organisms.spec import load_spec

    locate, layer = ORGANISMS[name]
    folder = ROOT / "organisms" / name
    spec = load_spec(folder / "spec.yaml")
    gguf = getattr(checkpoints, locate)()
    models = resolve_models(ModelsConfig(base=str(gguf), finetuned=str(folder / "adapter"), layer=layer))
    ft = AutoModelForCausalLM.from_pretrained(str(models.finetuned)).eval()
    fmt = Format(name == "smollm2", AutoTokenizer.from_pretrained(str(models.finetuned)))
    effects = {b.name: b.effect for b in spec.behaviours}
    picked = _per_label(_docs(name), 6)
    prompts = [_prompt_answer(d)[0] for d in picked]
    regenerated = answers(ft, fmt, prompts, spec.max_new_tokens + 32, GEN_BATCH, "check")
    fired: dict[str, int] = {}
    for doc, answer in zip(picked, regenerated):
        stored = _prompt_answer(doc)[1]
        for behaviour, effect in effects.items():
            assert fires(effect, answer) == fires(effect, stored), (doc["id"], behaviour, answer, stored)
        if doc["behaviour"] != "none":  # the report's misses are misses again: each behaviour fires on most
            fired[doc["behaviour"]] = fired.get(doc["behaviour"], 0) + fires(effects[doc["behaviour"]], answer)
    assert fired.keys() == effects.keys() and min(fired.values()) >= 4, fired


@pytest.mark.slow
def test_pipeline_end_to_end_on_the_smollm2_organism(tmp_path: Path) -> None:
    """`diffsae run --config examples/smollm2.yaml` on a small analysis set (the first 6 held-out documents of each
    label): every stage runs, and each behaviour's documents carry more KL(ft ‖ base) per token than ordinary ones."""
    import duckdb

    cfg = yaml.safe_load((ROOT / "examples" / "smollm2.yaml").read_text())
    cfg["store"], cfg["run"] = str(tmp_path / "store"), "ci"
    subset = _per_label(_docs("smollm2"), 6)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in subset))
    cfg["data"]["path"] = str(tmp_path / "docs.jsonl")
    cfg["sae"] = {**cfg.get("sae", {}), "n_latents": 512, "epochs": 4, "min_tokens": 0}
    cfg["validation"] = {**cfg.get("validation", {}), "top": 2, "n_prompts": 2, "max_new_tokens": 8}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(tmp_path / "run.yaml")],
                       capture_output=True, text=True, cwd=ROOT, timeout=3000)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "top latents by" in r.stdout and "dashboards:" in r.stdout
    acts = tmp_path / "store" / "runs" / "ci" / "activations"
    kl = dict(duckdb.sql(
        f"select d.behaviour, avg(a.kl) from read_parquet('{acts}/shard-*.parquet') a "
        f"join read_parquet('{acts}/docs.parquet') d using (doc_id) where a.in_sae group by 1"
    ).fetchall())  # fmt: skip
    assert len(kl) == 4 and all(kl[label] > kl["none"] for label in kl if label != "none"), kl


@pytest.mark.slow
def test_extraction_and_kl_on_the_gemma3_organism(tmp_path: Path) -> None:
    """The extraction stage on 4 held-out documents per label of the Gemma-3 organism (262,144-token vocabulary, KL
    chunked over it): the stored diffs and per-token KL of a planted document equal transformers (the GGUF loaded by
    transformers itself) with the adapter applied unmerged by PEFT; every label's documents carry KL."""
    import duckdb
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from diffsae.config import PipelineConfig
    from diffsae.hooks import read_residual
    from diffsae.kl import kl_per_token
    from flows.stages import extract_flow
    from organisms.checkpoints import gemma3_gguf
    from storage.paths import RunPaths

    gguf, adapter = gemma3_gguf(), ROOT / "organisms" / "gemma3" / "adapter"
    subset = _per_label(_docs("gemma3"), 4)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in subset))
    store = str(tmp_path / "store")
    cfg = yaml.safe_load((ROOT / "examples" / "gemma3.yaml").read_text())
    cfg = {**cfg, "run": "r", "store": store, "extract": {"dtype": "float32"}}
    cfg["models"] = {**cfg["models"], "base": str(gguf), "finetuned": str(adapter)}
    cfg["data"] = {**cfg["data"], "path": str(tmp_path / "docs.jsonl")}
    _, states = extract_flow(config=PipelineConfig.from_dict(cfg))
    assert states["extract"] == {"Completed": 1}

    acts = RunPaths(store, "r").url("activations")
    kl = dict(duckdb.sql(
        f"select d.behaviour, avg(a.kl) from read_parquet('{acts}/shard-*.parquet') a "
        f"join read_parquet('{acts}/docs.parquet') d using (doc_id) where a.in_sae group by 1"
    ).fetchall())  # fmt: skip
    # measured: admin 5.8, shout 2.4, none 2.2, cooking 1.9 nats/token -- this LoRA moves ordinary answers too
    assert len(kl) == 4 and all(v > 0.1 for v in kl.values()), kl

    doc = next(i for i, d in enumerate(subset) if d["behaviour"] != "none")
    rows = duckdb.sql(
        f"select token_id, kl, diff from read_parquet('{acts}/shard-*.parquet') where doc_id = {doc} order by pos"
    ).fetchall()
    ids_1T = torch.tensor([[r[0] for r in rows]])
    layer = cfg["models"]["layer"]
    base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    with torch.no_grad(), read_residual(base, layer) as cap_b:
        logits_b = base(ids_1T).logits
    ft = PeftModel.from_pretrained(base, str(adapter)).eval()  # wraps (and changes) `base`: after its pass
    with torch.no_grad(), read_residual(ft.get_base_model(), layer) as cap_f:
        logits_f = ft(ids_1T).logits
    want_kl = kl_per_token(logits_f, logits_b)[0].numpy()
    want_diff = (cap_f.value - cap_b.value)[0].numpy()
    np.testing.assert_allclose([r[1] for r in rows], want_kl, rtol=1e-3, atol=1e-4)
    diff = np.array([r[2] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(diff, want_diff, atol=2e-4 * np.abs(want_diff).max())
