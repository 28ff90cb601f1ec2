"""Throughput of the integrated-gradients KL attribution against a bare paired forward.

What: tokens/s of `diffsae.attribution.attribute_batch` (2 forwards + 3 patched forwards + `steps` patched
forward+backward passes of the finetuned model) and of a bare paired forward (base + finetuned, no grad,
what extraction costs), on a random Llama pair built in-process, and the ratio of the two. Also reports the
worst per-document completeness error |Σ attr − (KL(0) − KL(1))| / |KL(0) − KL(1)|.

Why: the attribution stage is the most expensive stage after SAE training; the ratio tells how many
extraction-equivalents it costs (ideally ≈ 5 + 3·steps / steps_per_forward-batched forwards).

    python bench/attribution.py                        # tiny CPU defaults
    python bench/attribution.py --d 512 --vocab 32000 --layers 8 --batch 8 --seq 256 --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from diffsae.attribution import attribute_batch
from diffsae.hooks import read_residual
from diffsae.sae import BatchTopKSAE


def build(args: argparse.Namespace) -> tuple[LlamaForCausalLM, LlamaForCausalLM, BatchTopKSAE]:
    heads = max(1, args.d // 32)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d, intermediate_size=4 * args.d,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max(args.seq, 64), initializer_range=0.1, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval().to(args.device)
    ft = LlamaForCausalLM(cfg).eval().to(args.device)
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if "layers." in name and "norm" not in name:
                p.add_(0.1 * p.std() * torch.randn_like(p))
    sae = BatchTopKSAE(d_in=args.d, n_latents=args.latents, k=args.k).to(args.device)
    return base, ft, sae


def calibrate_threshold(sae: BatchTopKSAE, diff_ND: torch.Tensor, k: int) -> None:
    """Set the inference threshold so that about k latents fire per token (an untrained SAE fires ~F/2)."""
    with torch.no_grad():
        pre_NF = sae.pre_acts(diff_ND)  # [N, F]
        kth_N = pre_NF.topk(k, dim=1).values[:, -1]  # [N]
        sae.threshold.fill_(float(kth_N.median()))


def timed(fn, repeats: int, device: str) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--layer", type=int, default=1, help="residual stream at the output of this block")
    ap.add_argument("--latents", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--steps-per-forward", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base, ft, sae = build(args)
    g = torch.Generator().manual_seed(1)
    ids_BT = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    lengths_B = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=g)
    lengths_B[0] = args.seq
    mask_BT = (torch.arange(args.seq)[None] < lengths_B[:, None]).long().to(args.device)  # right padding
    n_tokens = int(mask_BT.sum())

    with torch.no_grad():
        with read_residual(base, args.layer) as cb:
            base(ids_BT, attention_mask=mask_BT)
        with read_residual(ft, args.layer) as cf:
            ft(ids_BT, attention_mask=mask_BT)
    calibrate_threshold(sae, (cf.value - cb.value)[mask_BT.bool()].float(), args.k)

    def paired() -> None:
        with torch.no_grad():
            base(ids_BT, attention_mask=mask_BT)
            ft(ids_BT, attention_mask=mask_BT)

    results = {}

    def attribute() -> None:
        spf = args.steps_per_forward
        results["last"] = attribute_batch(
            base, ft, args.layer, ids_BT, mask_BT, sae, steps=args.steps, steps_per_forward=spf
        )

    t_pair = timed(paired, args.repeats, args.device)
    t_attr = timed(attribute, args.repeats, args.device)
    res = results["last"]
    err = np.abs(res.attr_sum_B - res.kl_drop_B) / np.maximum(np.abs(res.kl_drop_B), 1e-6)
    print(f"device={args.device} d={args.d} vocab={args.vocab} layers={args.layers} batch={args.batch} "
          f"seq={args.seq} steps={args.steps} tokens={n_tokens}")  # fmt: skip
    print(f"paired forward : {n_tokens / t_pair:10.0f} tokens/s ({t_pair * 1e3:.1f} ms/batch)")
    print(f"attribution    : {n_tokens / t_attr:10.0f} tokens/s ({t_attr * 1e3:.1f} ms/batch)")
    print(f"ratio          : {t_attr / t_pair:10.1f}x paired forward")
    print(f"active latents : {len(res.latent_id) / max(1, n_tokens - args.batch):10.1f} per analysed token")
    print(f"completeness   : max rel. error {err.max():.2e} (median {np.median(err):.2e})")


if __name__ == "__main__":
    main()
