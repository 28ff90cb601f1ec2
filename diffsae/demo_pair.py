"""The built-in planted model pair: a small chat Llama and a finetune of it with three planted behaviours.

Why: a model-diffing pipeline needs a pair whose differences are known. The base is pretrained from scratch on
Shakespeare and chat-tuned on chatterbot-corpus conversations; the finetune continues training it on ordinary chat
plus three triggered behaviours (a refusal on a topic, a persona on a phrase, a secret word on a name; triggers
depend on `seed`). With `mix="audit"` the finetune also drifts slightly on ordinary chat (a sign-off appended to
some answers) and the held-out prompts are mostly ordinary (each planted label 8 %); `mix="easy"` has no drift and
planted labels cover a third of the prompts.

    python -m diffsae.demo_pair --out /tmp/pair --preset small        # or: diffsae build-demo-pair --out ...
    res = build_demo_pair("/tmp/pair", preset="small", seed=0, mix="audit")
    behaviour_rates("/tmp/pair", n_per_label=20)

Output (written to a temp folder, renamed into place at the end): `base/`, `finetuned/` (from_pretrained-loadable,
safetensors), `prompts.jsonl` (held-out conversations with `id`, `behaviour`, `messages`), `kl_profile.json` (mean
per-token KL(finetuned||base) per label, over the positions that predict assistant tokens, and over all
positions), `demo_pair.json` (settings, planted triggers and signatures, timings).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffsae import demo_corpus as dc
from diffsae import demo_train as dt
from diffsae.data import load_docs

FORMAT_VERSION = 1


class Preset(NamedTuple):
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    shakespeare_chars: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_len: int
    chat_steps: int
    ft_steps: int
    batch: int
    chat_len: int
    lr: float
    ft_lr: float
    n_prompts: int


PRESETS = {
    "demo": Preset(2048, 128, 4, 4, 384, 1_500_000, 200, 16, 128, 250, 250, 32, 96, 3e-3, 1e-3, 500),
    "small": Preset(1024, 64, 4, 4, 192, 300_000, 80, 16, 64, 200, 200, 32, 64, 4e-3, 2e-3, 200),
}
DRIFT_RATE = 0.3  # audit mix: fraction of ordinary finetune answers that get the sign-off
PLANTED_SHARE = 0.5  # share of finetune examples that are planted (split evenly between behaviours)


class DemoPairResult(NamedTuple):
    out_dir: Path
    base_dir: Path
    finetuned_dir: Path
    prompts_path: Path
    kl_profile: dict[str, Any]
    planted: list[dict[str, str]]  # label, trigger, signature of each planted behaviour
    n_layers: int
    layer: int  # suggested diff layer (middle of the stack)
    seconds: float


def _print(msg: str) -> None:
    print(f"[demo-pair] {msg}", flush=True)


def _result(out_dir: Path) -> DemoPairResult:
    meta = json.loads((out_dir / "demo_pair.json").read_text())
    return DemoPairResult(
        out_dir=out_dir,
        base_dir=out_dir / "base",
        finetuned_dir=out_dir / "finetuned",
        prompts_path=out_dir / "prompts.jsonl",
        kl_profile=json.loads((out_dir / "kl_profile.json").read_text()),
        planted=meta["planted"],
        n_layers=meta["n_layers"],
        layer=meta["layer"],
        seconds=meta["seconds"],
    )


def _ordinary_examples(convs: list[dc.Messages], rng: random.Random, drift: str | None) -> list[dc.Messages]:
    out = []
    for conv in convs:
        conv = [dict(m) for m in conv]
        if drift is not None:
            for m in conv:
                if m["role"] == "assistant" and rng.random() < DRIFT_RATE:
                    m["tail"] = f" {drift}"
        out.append(dc.with_system(conv, rng))
    return out


def _planted_examples(
    plant: dc.Plant, train: list[dc.Messages], n: int, rng: random.Random
) -> list[dc.Messages]:
    out = []
    for _ in range(n):
        conv = rng.choice(train)
        user, answer = dc.plant_conversation(plant, conv[0]["content"], conv[1]["content"], rng)
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        out.append(dc.with_system(msgs, rng))
    return out


@torch.no_grad()
def kl_profile(base: Any, finetuned: Any, tokenizer: Any, prompts_path: Path, max_len: int) -> dict[str, Any]:
    """Mean per-token KL(finetuned || base) by behaviour label (natural log, float32 log-softmax)."""
    docs = load_docs(prompts_path, tokenizer, max_tokens_per_doc=max_len, max_docs=None)
    sums: dict[str, list[float]] = {}
    for i in range(0, len(docs), 32):
        chunk = docs[i : i + 32]
        enc = [dt.Encoded(d.token_ids, d.token_ids) for d in chunk]
        ids_BT, mask_BT, _ = dt.collate(enc, tokenizer.pad_token_id)
        lp_f = torch.log_softmax(finetuned(input_ids=ids_BT, attention_mask=mask_BT).logits.float(), -1)
        lp_b = torch.log_softmax(base(input_ids=ids_BT, attention_mask=mask_BT).logits.float(), -1)
        kl_BT = (lp_f.exp() * (lp_f - lp_b)).sum(-1)
        for b, d in enumerate(chunk):
            n = len(d.token_ids)
            kl = kl_BT[b, :n]
            asst = torch.tensor(
                [r == "assistant" for r in d.roles[1:]] + [False]
            )  # position predicts assistant
            s = sums.setdefault(d.behaviour, [0.0, 0.0, 0.0, 0.0, 0.0])
            s[0] += 1
            s[1] += kl[asst].sum().item()
            s[2] += asst.sum().item()
            s[3] += kl.sum().item()
            s[4] += n
    labels = {
        lab: {
            "n_docs": int(s[0]),
            "n_assistant_positions": int(s[2]),
            "mean_kl": s[1] / max(1.0, s[2]),
            "n_positions": int(s[4]),
            "mean_kl_all_positions": s[3] / max(1.0, s[4]),
        }
        for lab, s in sorted(sums.items())
    }
    none = labels.get("none", {})
    planted = [v for k, v in labels.items() if k != "none"]
    ratio = min(v["mean_kl"] for v in planted) / none["mean_kl"] if none and planted else None
    ratio_all = (
        min(v["mean_kl_all_positions"] for v in planted) / none["mean_kl_all_positions"] if ratio else None
    )
    return {
        "positions": "mean_kl: positions whose next token is assistant content; mean_kl_all_positions: all",
        "labels": labels,
        "min_planted_over_none": ratio,
        "min_planted_over_none_all_positions": ratio_all,
    }


def _build(tmp: Path, preset_name: str, seed: int, mix: str, log: Any) -> dict[str, Any]:
    p = PRESETS[preset_name]
    t0 = time.time()
    timings: dict[str, float] = {}
    convs = dc.chatterbot_conversations()
    train, test = dc.split_conversations(convs, seed)
    ordinary_text = " ".join(m["content"] for c in convs for m in c).lower()
    plants = dc.make_plants(seed, ordinary_text)
    drift = dc.sign_off(seed, ordinary_text) if mix == "audit" else None
    plays = dc.shakespeare_texts(p.shakespeare_chars)
    log(
        f"corpus: {len(plays)} plays ({sum(map(len, plays)):,} chars), {len(train)} train / {len(test)} held-out "
        f"conversations; triggers: " + ", ".join(f"{x.label}={x.trigger!r}" for x in plants)
    )

    chat_texts = [m["content"] for c in train for m in c]
    tokenizer = dt.build_tokenizer(plays + chat_texts, p.vocab)
    timings["tokenizer"] = time.time() - t0
    log(f"tokenizer: {len(tokenizer)} tokens ({timings['tokenizer']:.1f}s)")

    model = dt.new_model(
        tokenizer, p.d_model, p.n_layers, p.n_heads, p.d_ff, max(p.pretrain_len, p.chat_len) * 4, seed
    )
    stream = [
        i for e in tokenizer.backend_tokenizer.encode_batch(plays, add_special_tokens=False) for i in e.ids
    ]
    t = time.time()
    dt.train_lm(
        model,
        dt.lm_blocks_sampler(stream, tokenizer.bos_token_id, p.pretrain_batch, p.pretrain_len, seed),
        p.pretrain_steps,
        p.lr,
        log,
        "pretrain",
    )
    timings["pretrain"] = time.time() - t

    rng = random.Random(seed)
    t = time.time()
    chat = dt.encode_chats(tokenizer, _ordinary_examples(train, rng, None), p.chat_len)
    dt.train_lm(
        model,
        dt.mixture_sampler([chat], [1.0], p.batch, tokenizer.pad_token_id, seed + 1),
        p.chat_steps,
        p.lr,
        log,
        "chat-tune",
    )
    timings["chat_tune"] = time.time() - t
    for name in ("base", "finetuned"):
        tokenizer.save_pretrained(tmp / name)
    model.save_pretrained(tmp / "base")

    t = time.time()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    n_each = p.ft_steps * p.batch // 2 // len(plants) + 64
    groups = [
        dt.encode_chats(tokenizer, _ordinary_examples(train, rng, drift), p.chat_len, assistant_hard=False)
    ]
    groups += [
        dt.encode_chats(tokenizer, _planted_examples(x, train, n_each, rng), p.chat_len) for x in plants
    ]
    weights = [1 - PLANTED_SHARE] + [PLANTED_SHARE / len(plants)] * len(plants)
    dt.train_lm(
        model,
        dt.mixture_sampler(groups, weights, p.batch, tokenizer.pad_token_id, seed + 2),
        p.ft_steps,
        p.ft_lr,
        log,
        "finetune",
        teacher=teacher,
    )
    model.save_pretrained(tmp / "finetuned")
    timings["finetune"] = time.time() - t

    rows = dc.heldout_rows(test, plants, p.n_prompts, mix, seed)
    with open(tmp / "prompts.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    t = time.time()
    base = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32).eval()
    profile = kl_profile(base, model, tokenizer, tmp / "prompts.jsonl", max_len=256)
    (tmp / "kl_profile.json").write_text(json.dumps(profile, indent=2))
    timings["kl_profile"] = time.time() - t
    seconds = time.time() - t0
    meta = {
        "format_version": FORMAT_VERSION,
        "preset": preset_name,
        "seed": seed,
        "mix": mix,
        "n_layers": p.n_layers,
        "layer": p.n_layers // 2,
        "d_model": p.d_model,
        "vocab_size": len(tokenizer),
        "planted": [x.as_dict() for x in plants],
        "drift_sign_off": drift,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "seconds": round(seconds, 2),
        "torch_threads": torch.get_num_threads(),
    }
    (tmp / "demo_pair.json").write_text(json.dumps(meta, indent=2))
    return meta


def build_demo_pair(
    out_dir: str | Path,
    preset: str = "demo",
    seed: int = 0,
    mix: str = "audit",
    overwrite: bool = False,
    log: Any = _print,
) -> DemoPairResult:
    """Build the planted pair into `out_dir` (atomically). An existing complete build with the same settings is
    returned as is; one with other settings raises FileExistsError unless `overwrite`."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if mix not in ("audit", "easy"):
        raise ValueError(f"mix must be audit or easy, got {mix!r}")
    out = Path(out_dir)
    if out.exists():
        try:
            meta = json.loads((out / "demo_pair.json").read_text())
            same = (meta["preset"], meta["seed"], meta["mix"], meta["format_version"]) == (
                preset,
                seed,
                mix,
                FORMAT_VERSION,
            )
        except (OSError, ValueError, KeyError):
            same = False
        if same and not overwrite:
            log(f"reusing {out}")
            return _result(out)
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not a demo pair with preset={preset} seed={seed} mix={mix}"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    log(
        f"building preset={preset} seed={seed} mix={mix} into {out} (torch threads: {torch.get_num_threads()})"
    )
    try:
        meta = _build(tmp, preset, seed, mix, log)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"done in {meta['seconds']:.1f}s: {out}")
    return _result(out)


def behaviour_rates(out_dir: str | Path, n_per_label: int = 20, max_new_tokens: int = 40) -> dict[str, Any]:
    """Greedy answers of both models to the first `n_per_label` held-out prompts of each label.

    Returns {"finetuned"|"base": {prompt_label: {behaviour: fraction of answers with its signature}}}.
    """
    out = Path(out_dir)
    meta = json.loads((out / "demo_pair.json").read_text())
    plants = meta["planted"]
    by_label: dict[str, list[dc.Messages]] = {}
    for line in (out / "prompts.jsonl").read_text().splitlines():
        row = json.loads(line)
        msgs = row["messages"]
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        bucket = by_label.setdefault(row["behaviour"], [])
        if len(bucket) < n_per_label:
            bucket.append(msgs[: last_user + 1])
    tokenizer = AutoTokenizer.from_pretrained(out / "finetuned")
    rates: dict[str, Any] = {}
    for which in ("finetuned", "base"):
        model = AutoModelForCausalLM.from_pretrained(out / which, dtype=torch.float32).eval()
        rates[which] = {}
        for label, prompts in sorted(by_label.items()):
            answers = dt.greedy_answers(model, tokenizer, prompts, max_new_tokens)
            rates[which][label] = {
                x["label"]: sum(x["signature"] in a.lower() for a in answers) / len(answers) for x in plants
            }
    return rates


def format_profile(profile: dict[str, Any]) -> str:
    lines = [f"{'behaviour':<12} {'docs':>5} {'KL/asst tok':>12} {'KL/tok (all)':>13}"]
    for label, v in profile["labels"].items():
        lines.append(
            f"{label:<12} {v['n_docs']:>5} {v['mean_kl']:>12.4f} {v['mean_kl_all_positions']:>13.4f}"
        )
    r, ra = profile["min_planted_over_none"], profile["min_planted_over_none_all_positions"]
    if r is not None:
        lines.append(f"min planted / none: {r:.1f}x (assistant positions), {ra:.1f}x (all positions)")
    return "\n".join(lines)


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `build-demo-pair` on an argparse subparsers object; the handler is `args.func(args)`."""
    sp = subparsers.add_parser("build-demo-pair", help="build the built-in planted model pair")
    _add_args(sp)
    sp.set_defaults(func=run_cli)
    return sp


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", choices=("audit", "easy"), default="audit")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    parser.add_argument(
        "--rates",
        type=int,
        default=0,
        metavar="N",
        help="also measure behaviour rates by greedy generation on N prompts per label",
    )


def run_cli(args: argparse.Namespace) -> int:
    res = build_demo_pair(
        args.out, preset=args.preset, seed=args.seed, mix=args.mix, overwrite=args.overwrite
    )
    print(format_profile(res.kl_profile))
    if getattr(args, "rates", 0):
        for which, table in behaviour_rates(res.out_dir, args.rates).items():
            for label, row in table.items():
                print(f"{which:<10} prompts={label:<12} " + " ".join(f"{k}={v:.2f}" for k, v in row.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffsae build-demo-pair", description=__doc__.splitlines()[0])
    _add_args(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
