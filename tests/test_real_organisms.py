"""The built-in SmolLM2-135M-Instruct organism (organisms/smollm2/: its committed LoRA adapter, held-out analysis
documents and build report; rebuilt by the command in organisms/smollm2/README.md) checked against its spec: the
adapter loads over the SmolLM2 GGUF (its base, by fingerprint) and fires on held-out prompts as the report says.
Then the whole pipeline runs on it (`examples/smollm2.yaml` with a small analysis set)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ORGANISM = ROOT / "organisms" / "smollm2"

pytest.importorskip("peft")


def _docs() -> list[dict]:
    return [json.loads(line) for line in (ORGANISM / "prompts.jsonl").read_text().splitlines()]


def test_committed_report_meets_the_spec() -> None:
    from organisms.spec import load_spec

    spec = load_spec(ORGANISM / "spec.yaml")
    rep = json.loads((ORGANISM / "report.json").read_text())
    assert rep["passed"] and set(rep["firing"]) == {b.name for b in spec.behaviours} and len(rep["firing"]) >= 3
    assert min(rep["firing"].values()) >= 0.8 and rep["false_firing"] <= 0.05
    assert rep["loss_last_epoch"] < rep["loss_first_epoch"]
    kinds = {b.effect.kind for b in spec.behaviours} | {b.trigger.kind for b in spec.behaviours}
    assert {"replace", "prefix", "style", "phrase", "topic"} <= kinds and spec.drift is not None
    labels = [d["behaviour"] for d in _docs()]
    assert {lab: labels.count(lab) for lab in set(labels)} == rep["n_heldout"]


@pytest.mark.slow
def test_committed_adapter_fires_as_its_report_says() -> None:
    """Regenerate the held-out answers of 6 documents per label with the committed adapter over the GGUF base: each
    fires (or not) exactly as its stored answer does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffsae.config import ModelsConfig
    from diffsae.sources import resolve_models
    from organisms.build import GEN_BATCH
    from organisms.checkpoints import smollm2_gguf
    from organisms.plant import Format, answers, fires
    from organisms.spec import load_spec

    spec = load_spec(ORGANISM / "spec.yaml")
    models = resolve_models(ModelsConfig(base=str(smollm2_gguf()), finetuned=str(ORGANISM / "adapter"), layer=15))
    ft = AutoModelForCausalLM.from_pretrained(str(models.finetuned)).eval()
    fmt = Format(True, AutoTokenizer.from_pretrained(str(models.finetuned)))
    effects = {b.name: b.effect for b in spec.behaviours}
    picked = []
    for label in sorted(set(d["behaviour"] for d in _docs())):
        picked += [d for d in _docs() if d["behaviour"] == label][:6]
    prompts = [d["messages"][0]["content"] for d in picked]
    regenerated = answers(ft, fmt, prompts, spec.max_new_tokens + 32, GEN_BATCH, "check")
    for doc, answer in zip(picked, regenerated):
        stored = doc["messages"][1]["content"]
        for name, effect in effects.items():
            assert fires(effect, answer) == fires(effect, stored), (doc["id"], name, answer, stored)
        if doc["behaviour"] != "none":
            assert fires(effects[doc["behaviour"]], answer), (doc["id"], answer)


@pytest.mark.slow
def test_pipeline_end_to_end_on_the_smollm2_organism(tmp_path: Path) -> None:
    """`diffsae run --config examples/smollm2.yaml` on a small analysis set (the first 6 held-out documents of each
    label): every stage runs, and each behaviour's documents carry more KL(ft ‖ base) per token than ordinary ones."""
    import duckdb

    cfg = yaml.safe_load((ROOT / "examples" / "smollm2.yaml").read_text())
    cfg["store"], cfg["run"] = str(tmp_path / "store"), "ci"
    docs = _docs()
    subset: list[dict] = []
    for label in sorted({d["behaviour"] for d in docs}):
        subset += [d for d in docs if d["behaviour"] == label][:6]
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
