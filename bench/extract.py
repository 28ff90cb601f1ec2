"""Extraction throughput vs a bare paired forward pass, and peak memory vs dataset size.

    .venv/bin/python bench/extract.py [--pair DIR] [--preset small|demo] [--repeat 3]

1. Bare: both models over the same batches, diff + KL computed, nothing copied out or written.
2. Extraction: the real stage-1 path (diffsae.extract + storage.activations.ShardWriter: Arrow conversion, zstd
   Parquet on a background thread, sha256, atomic rename) into a temporary local store.
Prints tokens/s of both and their ratio (target ≥ 0.85). Then, in fresh subprocesses, the peak RSS of extracting
1 shard (a tenth of the dataset) vs 10 shards of that size (the whole dataset): bounded memory means the 10-shard
run peaks at about the same RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path = [p for p in sys.path if not p.endswith("/bench")]  # `bench/` must not shadow packages

import torch  # noqa: E402

from diffsae.config import local_cache_dir  # noqa: E402
from diffsae.data import load_docs  # noqa: E402
from diffsae.extract import extract_docs, pad_batch, paired_forward, plan_batches  # noqa: E402


def pair_dir(args: argparse.Namespace) -> Path:
    if args.pair:
        return Path(args.pair)
    cache = local_cache_dir() / f"bench-{args.preset}"
    if not (cache / "prompts.jsonl").exists():
        from organisms.demo_pair import build_demo_pair

        build_demo_pair(cache, preset=args.preset, seed=0, mix="audit")
    return cache


def load(pdir: Path, layer: int):  # type: ignore[no-untyped-def]
    from diffsae.config import ModelsConfig
    from diffsae.models import load_pair

    pair = load_pair(
        ModelsConfig(base=str(pdir / "base"), finetuned=str(pdir / "finetuned"), layer=layer, device="cpu"),
        needs_chat_template=True,
    )
    docs = load_docs(pdir / "prompts.jsonl", pair.tokenizer, 256)
    return pair, docs


def bare(pair, docs, layer: int, batch_tokens: int) -> float:  # type: ignore[no-untyped-def]
    t0, n = time.perf_counter(), 0
    for idx in plan_batches([len(d.token_ids) for d in docs], batch_tokens):
        ids, mask = pad_batch([docs[i] for i in idx], 0, pair.device)
        states, kl = paired_forward(pair.base, pair.finetuned, layer, ids, mask, torch.float32)
        (states.h_ft_BTD - states.h_base_BTD)[mask.bool()]  # the diff, left on the device
        n += int(mask.sum())
    return n / (time.perf_counter() - t0)


def extraction(pair, docs, layer: int, batch_tokens: int, shards: int = 1) -> float:  # type: ignore[no-untyped-def]
    from storage import activations as act
    from storage import schemas
    from storage.paths import RunPaths
    from storage.store import Store

    strings = [pair.tokenizer.decode([i]) for i in range(len(pair.tokenizer))]
    with tempfile.TemporaryDirectory() as tmp:
        paths, store = RunPaths(tmp, "bench"), Store(tmp)
        schema = schemas.activation_shard(pair.base.config.hidden_size, "float16", False)
        t0, n = time.perf_counter(), 0
        per = -(-len(docs) // shards)
        for s in range(shards):
            part = docs[s * per : (s + 1) * per]
            w = act.ShardWriter(store, paths, s, schema, strings)
            for b in extract_docs(pair.base, pair.finetuned, layer, part, batch_tokens, pair.device):
                w.put(b)
                n += b.n_tokens
            w.close(s * per, s * per + len(part), "bench")
        return n / (time.perf_counter() - t0)


def peak_rss_child(pdir: Path, layer: int, copies: int) -> None:
    pair, docs = load(pdir, layer)
    docs = docs[: max(1, len(docs) // 10) * copies]  # `copies` shards of a tenth of the dataset each
    extraction(pair, docs, layer, 2048, shards=copies)
    print(
        json.dumps(
            {
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "tokens": sum(len(d.token_ids) for d in docs),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--pair", help="A pair folder (base/, finetuned/, prompts.jsonl); default: build a preset"
    )
    ap.add_argument("--preset", default="small", choices=["small", "demo"])
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--_rss", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    pdir = pair_dir(args)
    if args._rss:
        return peak_rss_child(pdir, args.layer, args._rss)
    torch.set_num_threads(os.cpu_count() or 1)
    pair, docs = load(pdir, args.layer)
    n_tok = sum(len(d.token_ids) for d in docs)
    bare(pair, docs[:8], args.layer, args.batch_tokens)  # warm-up
    b_runs, e_runs = [], []
    for _ in range(args.repeat):  # interleaved, so machine load affects both alike
        b_runs.append(bare(pair, docs, args.layer, args.batch_tokens))
        e_runs.append(extraction(pair, docs, args.layer, args.batch_tokens))
    b, e = max(b_runs), max(e_runs)
    print(
        f"pair {pdir} ({n_tok} tokens, {len(docs)} docs, layer {args.layer}, d={pair.base.config.hidden_size})"
    )
    print(f"bare paired forward : {b:10.0f} tokens/s  (best of {args.repeat})")
    print(f"extraction (Parquet): {e:10.0f} tokens/s  (best of {args.repeat})")
    print(f"ratio extraction / bare: {e / b:.3f}  (target >= 0.85)")
    rss = {}
    for copies in (1, 10):
        r = subprocess.run(
            [
                sys.executable,
                __file__,
                "--pair",
                str(pdir),
                "--layer",
                str(args.layer),
                "--_rss",
                str(copies),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rss[copies] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"peak RSS, 1 shard  ({rss[1]['tokens']} tokens): {rss[1]['peak_rss_mb']:.0f} MB")
    print(
        f"peak RSS, 10 shards ({rss[10]['tokens']} tokens): {rss[10]['peak_rss_mb']:.0f} MB "
        f"(ratio {rss[10]['peak_rss_mb'] / rss[1]['peak_rss_mb']:.2f})"
    )


if __name__ == "__main__":
    main()
