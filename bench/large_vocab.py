"""Peak memory and time of extraction and attribution on Gemma-3-270m (262,144-token vocabulary).

    .venv/bin/python bench/large_vocab.py [--tokens 1024] [--repeat 1]

Each measurement runs in a fresh subprocess (peak RSS = its ru_maxrss): the two models loaded and nothing else
(`load`), one extraction batch of `--tokens` tokens as diffsae does it now (`extract`: logits a chunk of positions at
a time from the final hidden state, diffsae.head) and as it did before (`extract-full`: both models' [B, T, V] logits,
then the chunked KL), and one attribution batch (`--attr-tokens`, 64 per document; the product's default rule and
points) through diffsae.attribution.
The "finetuned" model is the base with every weight of its upper half perturbed (1e-2 relative noise): memory and
time do not depend on what the finetune learned. Prints one line per mode and the peak RSS above `load`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path = [p for p in sys.path if not p.endswith("/bench")]  # `bench/` must not shadow packages

import torch  # noqa: E402

MODES = ("load", "extract", "extract-full", "attribute")


def _models():  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    from diffsae.config import ModelsConfig
    from diffsae.sources import resolve_models
    from organisms.checkpoints import gemma3_gguf

    gguf = str(gemma3_gguf())
    folder = str(resolve_models(ModelsConfig(base=gguf, finetuned=gguf)).base)
    base = AutoModelForCausalLM.from_pretrained(folder).eval().requires_grad_(False)
    ft = AutoModelForCausalLM.from_pretrained(folder).eval().requires_grad_(False)
    with torch.no_grad():  # touch every weight (safetensors maps files lazily): `load` is the models' full RSS
        for m in (base, ft):
            sum(float(p.float().sum()) for p in m.parameters())
    g = torch.Generator().manual_seed(0)
    n = ft.config.num_hidden_layers
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if any(f"layers.{i}." in name for i in range(n // 2, n)):
                p.add_(torch.randn(p.shape, generator=g) * 1e-2 * p.abs().mean())
    return base, ft


def child(mode: str, tokens: int, attr_tokens: int) -> dict:
    torch.set_num_threads(1)
    base, ft = _models()
    layer = base.config.num_hidden_layers // 2
    V = base.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    if mode in ("extract", "extract-full"):
        from diffsae.extract import paired_forward
        from diffsae.kl import kl_per_token

        T = 256
        ids_BT = torch.randint(10, V, (max(1, tokens // T), T), generator=g)
        mask_BT = torch.ones_like(ids_BT)
        if mode == "extract":
            paired_forward(base, ft, layer, ids_BT, mask_BT, torch.float32)
        else:
            with torch.no_grad():
                kl_per_token(ft(input_ids=ids_BT, attention_mask=mask_BT).logits,
                             base(input_ids=ids_BT, attention_mask=mask_BT).logits)  # fmt: skip
    elif mode == "attribute":
        from diffsae.attribution import attribute_batch
        from diffsae.config import AttributionConfig
        from diffsae.sae import BatchTopKSAE

        ids_BT = torch.randint(10, V, (max(1, attr_tokens // 64), 64), generator=g)
        sae = BatchTopKSAE(d_in=base.config.hidden_size, n_latents=4096, k=32, seed=0)
        a = AttributionConfig()  # the product's defaults: rule and points
        attribute_batch(base, ft, layer, ids_BT, torch.ones_like(ids_BT), sae, steps=a.steps, rule=a.rule)
    seconds = time.perf_counter() - t0
    return {"mode": mode, "seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024, help="extraction batch size in tokens (256 per document)")
    ap.add_argument("--attr-tokens", type=int, default=128, help="attribution batch size in tokens (64 per document)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.attr_tokens)))
        return
    _models()  # dequantize the checkpoint once, outside the measurements
    results: dict[str, list[dict]] = {}
    modes = ["load"] + [m for m in args.modes.split(",") if m in MODES and m != "load"]
    for _ in range(args.repeat):
        for mode in modes:
            cmd = [sys.executable, __file__, "--child", mode, "--tokens", str(args.tokens),
                   "--attr-tokens", str(args.attr_tokens)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results.setdefault(mode, []).append(json.loads(out))
    load = statistics.median(r["peak_rss_gb"] for r in results["load"])
    print(f"Gemma-3-270m, vocabulary 262,144, 1 thread, extraction batch {args.tokens} tokens, attribution batch "
          f"{args.attr_tokens} tokens, median of {args.repeat}")
    for mode in modes:
        rss = [r["peak_rss_gb"] for r in results[mode]]
        sec = [r["seconds"] for r in results[mode]]
        med = statistics.median(rss)
        print(f"{mode:>13}: peak RSS {med:6.2f} GB (+{med - load:5.2f} over load; spread {min(rss):.2f}-{max(rss):.2f})"
              f"  {statistics.median(sec):7.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
