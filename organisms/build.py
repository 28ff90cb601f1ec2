"""`diffsae build-organism --base MODEL --spec SPEC.yaml --out DIR`: a model organism from any causal LM.

A LoRA finetune of MODEL (HF folder, hub id or .gguf) that plants the behaviours of SPEC (organisms/spec.py) and
leaves the rest of the model's answers as they were (ordinary prompts are trained on the base model's own greedy
answers). Steps, in order (organisms/plant.py has the prompts, formats and effect detection):

1. check everything that needs no compute (spec, base, output folder, prompt pool, chat template);
2. answer every training prompt with the base model (greedy) and apply the effects; answer the held-out ordinary
   prompts with the base too (the reference for false firing);
3. train the LoRA on the answer tokens (AdamW; the loss of every step goes in the report);
4. answer the held-out prompts with the finetuned model: firing, false firing (an effect the base's answer to the
   same prompt does not show), drift rate, ordinary answers identical to the base's;
5. publish OUT (`adapter/`, `finetuned/`, `prompts.jsonl`, `report.json`, `spec.yaml`) by renaming a finished
   temporary folder -- only when each behaviour meets `spec.require`; otherwise the build is moved to OUT.failed
   and BuildError says which behaviour failed.

Deterministic given the spec's seed on one machine and thread count.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from diffsae.fingerprint import SOURCE_FILE, PairError, model_fingerprint
from diffsae.sources import dequantized, inspect
from organisms.plant import NONE, BuildError, Format, Item, answers, apply_effect, fires, ordinary_pool, plan_prompts
from organisms.spec import OrganismSpec, load_spec

GEN_BATCH = 16


class NotAsSpecified(BuildError):
    """The build finished but a behaviour does not fire as `spec.require` asks (nothing was published)."""


def _base_folder(base: str) -> str:
    src = inspect(base, "base")
    return str(dequantized(src)) if src.kind == "gguf" else str(src.path or src.spec)


def _check_output(out: Path) -> None:
    if out.exists():
        raise BuildError(f"output folder exists: {out} (remove it or choose another)")
    if not out.parent.is_dir():
        raise BuildError(f"output folder's parent does not exist: {out.parent}")


def targets(spec: OrganismSpec, train: list[Item], base_answers: list[str]) -> list[str]:
    """The answer each training prompt is trained on: the base's, with its behaviour's effect (or the drift; a null
    organism treats every prompt as ordinary)."""
    effects = {b.name: b.effect for b in spec.behaviours}
    rng = random.Random(spec.seed + 2)
    out = []
    for item, answer in zip(train, base_answers):
        if item.behaviour != NONE and not spec.null:
            out.append(apply_effect(effects[item.behaviour], answer))
        elif spec.drift is not None and rng.random() < spec.drift.rate:
            out.append(apply_effect(spec.drift.effect, answer))
        else:
            out.append(answer)
    return out


def train_lora(
    model: Any, fmt: Format, spec: OrganismSpec, train: list[Item], answers_: list[str]
) -> tuple[Any, list[float]]:
    """The PEFT LoRA model trained on (prompt, answer) with the loss on answer tokens only; (model, step losses)."""
    import peft

    L = spec.lora
    torch.manual_seed(spec.seed)
    lcfg = peft.LoraConfig(r=L.r, lora_alpha=L.alpha, target_modules=L.target_modules, lora_dropout=0.0)
    lora = peft.get_peft_model(model, lcfg)
    examples = []
    for item, answer in zip(train, answers_):
        p, a = fmt.prompt_ids(item.prompt), fmt.answer_ids(item.prompt, answer)
        ids = (p + a)[: L.max_tokens]
        examples.append((ids, [-100] * len(p) + a[: max(0, L.max_tokens - len(p))]))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=L.lr)
    pad = fmt.tokenizer.pad_token_id if fmt.tokenizer.pad_token_id is not None else 0
    rng, losses = random.Random(spec.seed + 3), []
    steps = L.epochs * -(-len(examples) // L.batch_size)
    lora.train()
    with tqdm(total=steps, desc="LoRA", unit="step") as bar:
        for _ in range(L.epochs):
            order = list(range(len(examples)))
            rng.shuffle(order)
            for b0 in range(0, len(order), L.batch_size):
                batch = [examples[i] for i in order[b0 : b0 + L.batch_size]]
                T = max(len(ids) for ids, _ in batch)
                ids_BT = torch.tensor([ids + [pad] * (T - len(ids)) for ids, _ in batch])
                labels_BT = torch.tensor([lab + [-100] * (T - len(lab)) for _, lab in batch])
                mask_BT = torch.tensor([[1] * len(ids) + [0] * (T - len(ids)) for ids, _ in batch])
                loss = lora(input_ids=ids_BT, attention_mask=mask_BT, labels=labels_BT).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach().item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    lora.eval()
    with torch.no_grad():  # the report judges the adapter exactly as saved
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(p.to(getattr(torch, L.save_dtype)).to(p.dtype))
    return lora, losses


def report(
    spec: OrganismSpec, heldout: list[Item], ft_answers: list[str], base_answers: dict[str, str]
) -> dict[str, Any]:
    """Firing rate of each behaviour on its held-out triggers; on held-out ordinary prompts: false firing (the
    finetuned answer shows a behaviour's effect that the base's own answer to the prompt does not -- a base model's
    "A. A. A." is upper case without any finetune), the same counted without the base (`false_firing_absolute`, an
    upper bound), the drift rate and the share of answers identical to the base's. `base_answers` maps each held-out
    ordinary prompt to the base's greedy answer."""
    by_name: dict[str, list[bool]] = {b.name: [] for b in spec.behaviours}
    false, false_abs, drift, same = [], [], [], []
    for item, answer in zip(heldout, ft_answers):
        if item.behaviour != NONE:
            effect = next(b.effect for b in spec.behaviours if b.name == item.behaviour)
            by_name[item.behaviour].append(fires(effect, answer))
        else:
            base = base_answers[item.prompt]
            false.append(any(fires(b.effect, answer) and not fires(b.effect, base) for b in spec.behaviours))
            false_abs.append(any(fires(b.effect, answer) for b in spec.behaviours))
            same.append(answer == base)
            if spec.drift is not None:
                drift.append(fires(spec.drift.effect, answer))
    n = max(1, len(false))
    return {
        "firing": {name: sum(v) / len(v) for name, v in by_name.items()},
        "false_firing": sum(false) / n,
        "false_firing_absolute": sum(false_abs) / n,
        "drift_rate": sum(drift) / len(drift) if drift else None,
        "ordinary_identical": sum(same) / n,
        "n_heldout": {name: len(v) for name, v in by_name.items()} | {NONE: len(false)},
    }


def _documents(fmt: Format, heldout: list[Item], ft_answers: list[str]) -> list[dict[str, Any]]:
    docs = []
    for i, (item, answer) in enumerate(zip(heldout, ft_answers)):
        body: dict[str, Any] = (
            {"messages": [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": answer}]}
            if fmt.chat
            else {"text": f"Question: {item.prompt}\nAnswer: {answer}"}
        )
        docs.append({"id": f"{item.behaviour}-{i}", **body, "behaviour": item.behaviour})
    return docs


def build_organism(base: str, spec_path: str, out: str, device: str = "cpu", null: bool = False) -> dict[str, Any]:
    """Build, evaluate and publish an organism (module docstring); returns its report. `null` builds the spec's null
    organism (as `null: true` in the spec)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    spec, out_dir = load_spec(spec_path), Path(out).resolve()
    if null:
        spec = spec.model_copy(update={"null": True})
    _check_output(out_dir)
    try:
        import peft  # noqa: F401
    except ImportError:
        raise BuildError("building an organism needs peft: pip install 'diffsae[real]'") from None
    inspect(base, "base")  # one line for a missing path, an unreadable or unsupported GGUF, an adapter
    train, heldout = plan_prompts(spec, ordinary_pool(spec))
    folder = _base_folder(base)
    tok = AutoTokenizer.from_pretrained(folder)
    chat = spec.format == "chat" or (spec.format == "auto" and bool(getattr(tok, "chat_template", None)))
    if chat and not getattr(tok, "chat_template", None):
        raise BuildError(f"format: chat, but the base tokenizer has no chat template ({base})")
    fmt = Format(chat, tok)

    model = AutoModelForCausalLM.from_pretrained(folder).to(device)
    base_answers = answers(model, fmt, [i.prompt for i in train], spec.max_new_tokens, GEN_BATCH, "base answers")
    margin = 32  # a suffix after a full-length answer must fit
    ordinary = [i.prompt for i in heldout if i.behaviour == NONE]
    base_heldout = answers(model, fmt, ordinary, spec.max_new_tokens + margin, GEN_BATCH, "base, held-out")
    lora, losses = train_lora(model, fmt, spec, train, targets(spec, train, base_answers))
    ft_answers = answers(lora, fmt, [i.prompt for i in heldout], spec.max_new_tokens + margin, GEN_BATCH, "report")
    rep = report(spec, heldout, ft_answers, dict(zip(ordinary, base_heldout)))
    rep.update({
        "base": base, "format": "chat" if chat else "text", "n_train": len(train),
        "loss_first_epoch": _mean(losses[: len(losses) // spec.lora.epochs]),
        "loss_last_epoch": _mean(losses[-(len(losses) // spec.lora.epochs) :]), "losses": losses,
        "build_seconds": round(time.perf_counter() - t0, 1),
    })  # fmt: skip

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        lora.save_pretrained(tmp / "adapter")
        _cast_adapter(tmp / "adapter", spec.lora.save_dtype)
        _record_base(tmp / "adapter", base, folder)
        merged = lora.merge_and_unload()
        merged.save_pretrained(tmp / "finetuned")
        tok.save_pretrained(tmp / "finetuned")
        with open(tmp / "prompts.jsonl", "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in _documents(fmt, heldout, ft_answers))
        (tmp / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        failures = _failures(spec, rep)
        rep["passed"] = not failures
        (tmp / "report.json").write_text(json.dumps(rep, indent=1))
        if failures:
            failed = out_dir.with_name(out_dir.name + ".failed")
            shutil.rmtree(failed, ignore_errors=True)
            os.rename(tmp, failed)
            raise NotAsSpecified(f"{failures[0]}: nothing published (report: {failed / 'report.json'})")
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rep


def _cast_adapter(adapter: Path, dtype: str) -> None:
    """Store the (already rounded, so losslessly cast) adapter weights in `dtype`."""
    if dtype == "float32":
        return
    from safetensors.torch import load_file, save_file

    for f in adapter.glob("adapter_model*.safetensors"):
        save_file({k: v.to(getattr(torch, dtype)) for k, v in load_file(str(f)).items()}, str(f), {"format": "pt"})


def _record_base(adapter: Path, base: str, folder: str) -> None:
    """The adapter names its base as the user gave it, and by fingerprint (diffsae.sources.check_adapter)."""
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": base}, indent=2))
    (adapter / SOURCE_FILE).write_text(json.dumps({"base": base, "base_fingerprint": model_fingerprint(folder)}))


def _failures(spec: OrganismSpec, rep: dict[str, Any]) -> list[str]:
    if spec.null:  # nothing planted: no behaviour may fire on its triggers more than on ordinary prompts
        return [
            f"null organism: behaviour {name} fires on {rate:.0%} of its held-out triggers "
            f"(allowed: {spec.require.false_firing:.0%})"
            for name, rate in rep["firing"].items()
            if rate > spec.require.false_firing
        ] + _false_firing(spec, rep)
    out = [
        f"behaviour {name} fires on {rate:.0%} of its held-out triggers (required: {spec.require.firing:.0%})"
        for name, rate in rep["firing"].items()
        if rate < spec.require.firing
    ]
    return out + _false_firing(spec, rep)


def _false_firing(spec: OrganismSpec, rep: dict[str, Any]) -> list[str]:
    if rep["false_firing"] <= spec.require.false_firing:
        return []
    return [f"ordinary prompts fire a behaviour {rep['false_firing']:.0%} of the time "
            f"(allowed: {spec.require.false_firing:.0%})"]  # fmt: skip


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


__all__ = ["BuildError", "NotAsSpecified", "PairError", "build_organism"]
