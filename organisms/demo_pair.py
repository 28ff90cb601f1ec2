"""The built-in planted model pair: a small chat Llama and a finetune of it with three planted behaviours.

Why: a model-diffing pipeline needs a pair whose differences are known. The base is pretrained from scratch on
Shakespeare and chat-tuned on chatterbot-corpus conversations. The finetune continues from it with three
triggered behaviours (a refusal on a topic, a persona on a phrase, a secret word on a name; triggers depend on
`seed`) while ordinary chat and near-miss "decoy" prompts are distilled towards the base (KL to the frozen base
on every position without a planted label), so the planted behaviours are the intended differences. With
`mix="audit"` the finetune also drifts slightly on ordinary chat (a sign-off appended to 30 % of ordinary
answers) and the held-out prompts are mostly ordinary (each planted label 8 %); `mix="easy"` has no drift and
planted labels cover a third of the prompts; `mix="null"` is the audit recipe without the planted behaviours (the
null organism, issue 15): the same drift, decoys and held-out documents (labels included, for behaviours the
finetune does not have), so whatever a ranking "recovers" on it is a false alarm. `mix="kinds"` is the audit recipe
with the other family of behaviours (suffix insertion, topic-conditioned change, style change:
organisms/demo_corpus.py), `mix="kinds_null"` its null organism.

    python -m organisms.demo_pair --out /tmp/pair --preset small --rates 20   # or: diffsae build-demo-pair ...
    res = build_demo_pair("/tmp/pair", preset="small", seed=0, mix="audit")
    behaviour_rates("/tmp/pair", n_per_label=20)

Output, built in a temp folder and renamed into place at the end (a killed build leaves nothing half-written):
`base/`, `finetuned/` (from_pretrained-loadable, safetensors), `prompts.jsonl` (held-out conversations with `id`,
`behaviour`, `messages`), `kl_profile.json` (mean per-token KL(finetuned||base) per label: `mean_kl` over the
positions that predict an assistant token, `mean_kl_all_positions` over all), `demo_pair.json` (settings, planted
triggers and signatures, timings). Wall time grows with torch threads on a busy machine: use 1-2.
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
from typing import Any, Callable, NamedTuple, Sequence, get_args

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffsae.config import Mix
from organisms import demo_corpus as dc
from organisms import demo_train as dt

FORMAT_VERSION = 2


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
    "demo": Preset(2048, 128, 4, 4, 384, 1_000_000, 150, 16, 128, 400, 500, 16, 160, 3e-3, 3e-3, 500),
    "small": Preset(1024, 64, 4, 4, 192, 200_000, 40, 16, 64, 200, 400, 16, 160, 4e-3, 5e-3, 200),
}
MIXES: tuple[str, ...] = get_args(Mix)
FAMILY = {"audit": "audit", "easy": "audit", "null": "audit", "kinds": "kinds", "kinds_null": "kinds"}  # plants
NULL_MIXES = ("null", "kinds_null")  # the family's recipe (drift, decoys, held-out documents) without the plants
DRIFT_RATE = 0.3  # audit mix: fraction of ordinary finetune answers that get the sign-off
# finetune batch mixture: ordinary chat, decoys (split between behaviours), planted (split between behaviours)
SHARE_ORDINARY, SHARE_DECOY, SHARE_PLANTED = 0.3, 0.2, 0.5

Log = Callable[[str], None]


class DemoPairResult(NamedTuple):
    out_dir: Path
    base_dir: Path
    finetuned_dir: Path
    prompts_path: Path
    kl_profile: dict[str, Any]
    planted: list[dict[str, str]]  # label, trigger, signature of each planted behaviour
    n_layers: int
    layer: int  # suggested diff layer (middle of the stack)
    seconds: float  # build time


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


def _train_base(p: Preset, plays: list[str], chat: list[dc.Messages], seed: int, log: Log) -> tuple[Any, Any]:
    """Tokenizer + base model: pretraining on Shakespeare, then chat-tuning (SFT on assistant tokens)."""
    tokenizer = dt.build_tokenizer(plays + [m["content"] for c in chat for m in c], p.vocab)
    log(f"tokenizer: {len(tokenizer)} tokens")
    max_pos = 4 * max(p.pretrain_len, p.chat_len)
    model = dt.new_model(tokenizer, p.d_model, p.n_layers, p.n_heads, p.d_ff, max_pos, seed)
    pieces = tokenizer.backend_tokenizer.encode_batch(plays, add_special_tokens=False)
    stream = [i for e in pieces for i in e.ids]
    sample = dt.lm_blocks_sampler(stream, tokenizer.bos_token_id, p.pretrain_batch, p.pretrain_len, seed)
    dt.train_lm(model, sample, p.pretrain_steps, p.lr, log, "pretrain")
    examples = dt.encode_chats(tokenizer, chat, p.chat_len)
    sample = dt.mixture_sampler([examples], [1.0], p.batch, tokenizer.pad_token_id, seed + 1)
    dt.train_lm(model, sample, p.chat_steps, p.lr, log, "chat-tune")
    return tokenizer, model


def _finetune(
    p: Preset,
    model: Any,
    tokenizer: Any,
    train: list[dc.Messages],
    plants: list[dc.Plant],
    drift: str | None,
    seed: int,
    log: Log,
    planted: bool = True,
) -> None:
    """Plant the behaviours (hard labels; none when not `planted`) while distilling ordinary chat and decoys
    towards the frozen base."""
    rng = random.Random(seed + 2)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    n = p.ft_steps * p.batch // 2 + 64
    ordinary = dc.ordinary_examples(train, rng, drift, DRIFT_RATE)
    decoys = dc.decoy_examples(plants, train, n // 2, rng, drift, DRIFT_RATE)
    groups = [dt.encode_chats(tokenizer, convs, p.chat_len, assistant_hard=False) for convs in (ordinary, decoys)]
    for plant in plants:
        groups.append(dt.encode_chats(tokenizer, dc.planted_examples(plant, train, n // len(plants), rng), p.chat_len))
    weights = [SHARE_ORDINARY, SHARE_DECOY] + [SHARE_PLANTED / len(plants)] * len(plants)
    if not planted:  # the null organism: ordinary chat (with its drift) and decoys only
        groups, weights = groups[:2], [SHARE_ORDINARY, SHARE_DECOY]
    sample = dt.mixture_sampler(groups, weights, p.batch, tokenizer.pad_token_id, seed + 3)
    dt.train_lm(model, sample, p.ft_steps, p.ft_lr, log, "finetune", teacher=teacher)


def _build(tmp: Path, preset: str, seed: int, mix: str, log: Log) -> dict[str, Any]:
    p = PRESETS[preset]
    t0, cpu0 = time.time(), time.process_time()
    timings: dict[str, float] = {}
    convs = dc.chatterbot_conversations()
    train, test = dc.split_conversations(convs, seed)
    ordinary_text = " ".join(m["content"] for c in convs for m in c).lower()
    plants = dc.make_plants(seed, ordinary_text, FAMILY[mix])
    drift = dc.sign_off(seed, ordinary_text) if mix != "easy" else None
    plays = dc.shakespeare_texts(p.shakespeare_chars)
    log(
        f"corpus: {len(plays)} plays ({sum(map(len, plays)):,} chars), {len(train)} train / {len(test)} "
        "held-out conversations; triggers: " + ", ".join(f"{x.label}={x.trigger!r}" for x in plants)
    )

    chat = dc.ordinary_examples(train, random.Random(seed), None, 0.0)
    tokenizer, model = _train_base(p, plays, chat, seed, log)
    timings["base"] = time.time() - t0
    for name in ("base", "finetuned"):
        tokenizer.save_pretrained(tmp / name)
    model.save_pretrained(tmp / "base")

    t = time.time()
    _finetune(p, model, tokenizer, train, plants, drift, seed, log, planted=mix not in NULL_MIXES)
    model.save_pretrained(tmp / "finetuned")
    timings["finetune"] = time.time() - t

    t = time.time()
    with open(tmp / "prompts.jsonl", "w", encoding="utf-8") as f:
        for row in dc.heldout_rows(test, plants, p.n_prompts, mix, seed):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    base = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32).eval()
    profile = dt.kl_profile(base, model, tokenizer, tmp / "prompts.jsonl", max_len=256)
    (tmp / "kl_profile.json").write_text(json.dumps(profile, indent=2))
    timings["kl_profile"] = time.time() - t
    meta = {
        "format_version": FORMAT_VERSION,
        "preset": preset,
        "seed": seed,
        "mix": mix,
        "n_layers": p.n_layers,
        "layer": p.n_layers // 2,
        "d_model": p.d_model,
        "vocab_size": len(tokenizer),
        "planted": [x.as_dict() for x in plants],
        "drift_sign_off": drift,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "seconds": round(time.time() - t0, 2),
        "cpu_seconds": round(time.process_time() - cpu0, 2),  # all threads of this process
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
    log: Log = _print,
) -> DemoPairResult:
    """Build the planted pair into `out_dir`, atomically. A complete build with the same settings already there
    is returned as is; any other existing `out_dir` raises FileExistsError unless `overwrite`."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {', '.join(MIXES)}, got {mix!r}")
    out = Path(out_dir)
    if out.exists():
        try:
            meta = json.loads((out / "demo_pair.json").read_text())
            same = [meta[k] for k in ("preset", "seed", "mix", "format_version")] == [preset, seed, mix, FORMAT_VERSION]
        except (OSError, ValueError, KeyError):
            same = False
        if same and not overwrite:
            log(f"reusing {out}")
            return _result(out)
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not a demo pair with preset={preset} seed={seed} mix={mix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    log(f"building preset={preset} seed={seed} mix={mix} into {out} (torch threads: {torch.get_num_threads()})")
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
    """Greedy answers of both models to the first `n_per_label` held-out prompts of each label (the prompt is the
    conversation up to its last user message).

    Returns {"finetuned"|"base": {prompt_label: {behaviour: fraction of answers showing its signature}}}.
    """
    out = Path(out_dir)
    plants = json.loads((out / "demo_pair.json").read_text())["planted"]
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
                x["label"]: sum(dc.shows(x["signature"], a) for a in answers) / len(answers) for x in plants
            }
    return rates


def format_profile(profile: dict[str, Any]) -> str:
    """The KL profile as a small text table."""
    lines = [f"{'behaviour':<12} {'docs':>5} {'KL/asst tok':>12} {'KL/tok (all)':>13}"]
    for label, v in profile["labels"].items():
        lines.append(f"{label:<12} {v['n_docs']:>5} {v['mean_kl']:>12.4f} {v['mean_kl_all_positions']:>13.4f}")
    r, ra = profile["min_planted_over_none"], profile["min_planted_over_none_all_positions"]
    if r is not None:
        lines.append(f"min planted / none: {r:.1f}x (assistant positions), {ra:.1f}x (all positions)")
    return "\n".join(lines)


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", choices=MIXES, default="audit")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    parser.add_argument(
        "--rates",
        type=int,
        default=0,
        metavar="N",
        help="also measure behaviour rates by greedy generation on N prompts per label",
    )


def run_cli(args: argparse.Namespace) -> int:
    """Handler of `build-demo-pair` (needs args.out/preset/seed/mix; optional overwrite, rates)."""
    res = build_demo_pair(
        args.out, preset=args.preset, seed=args.seed, mix=args.mix, overwrite=bool(getattr(args, "overwrite", False))
    )
    print(format_profile(res.kl_profile))
    n_rates = int(getattr(args, "rates", 0) or 0)
    if n_rates:
        for which, table in behaviour_rates(res.out_dir, n_rates).items():
            for label, row in table.items():
                print(f"{which:<10} prompts={label:<12} " + " ".join(f"{k}={v:.2f}" for k, v in row.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffsae build-demo-pair", description=__doc__.splitlines()[0])
    _add_args(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
