"""Throughput of the integrated-gradients KL attribution against a bare paired forward, old and new path.

What: tokens/s of `diffsae.attribution.attribute_batch` (2 forwards + 3 patched forwards + `steps` patched
forward+backward passes of the finetuned model) and of a bare paired forward (base + finetuned, no grad,
what extraction costs), on a random Llama pair built in-process, and the ratio of the two, for two paths in the
same run: `full` (every patched pass runs the whole model, the output of block L replaced by a hook: the path
before diffsae.hooks.run_from) and `upper` (patched passes run only the blocks above L), each with `--rule`/
`--steps` and the old 16-point midpoint rule. Median of `--repeats` timings, with min-max. Also reports the worst
per-document completeness error |Σ attr − (KL(0) − KL(1))| / |KL(0) − KL(1)|.

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
from old_path import use_path  # bench/old_path.py: the path before 2026-11-30
from transformers import LlamaConfig, LlamaForCausalLM

from diffsae.attribution import AttributionBatch, Selection, attribute_batch
from diffsae.config import AttributionConfig
from diffsae.documents import NOISE_NATS
from diffsae.extract import States, paired_forward
from diffsae.hooks import read_residual
from diffsae.sae import BatchTopKSAE

MAX_REL_ERROR, MAX_STEPS = AttributionConfig().max_rel_error, AttributionConfig().max_steps  # the stage's refinement


def completeness(res: AttributionBatch) -> np.ndarray:
    """Per document |Σ attr − (KL(0) − KL(1))| / |KL(0) − KL(1)|, float64 [B]."""
    drop_B = res.kl_drop_B.astype(np.float64)
    return np.abs(res.attr_sum_B.astype(np.float64) - drop_B) / np.maximum(np.abs(drop_B), 1e-6)


def gap(res: AttributionBatch, b: int) -> float:
    return abs(float(res.attr_sum_B[b]) - float(res.kl_drop_B[b]))


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


def timed(fn, repeats: int, device: str) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds of each of `repeats` calls, after a warm-up call."""
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


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
    ap.add_argument("--steps", type=int, nargs="+", default=[16], help="quadrature points of the new configurations")
    ap.add_argument("--rule", default="midpoint", choices=["midpoint", "gauss_legendre"])
    ap.add_argument(
        "--precision", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
        help="gradient passes' precision of the new configurations (attribution.precision)",
    )  # fmt: skip
    ap.add_argument(
        "--states", action="store_true",
        help="also time each new configuration with extraction's stored states (extract.save_states: h_base, h_ft, "
        "x_ft made by the paired forward, as extraction does, before the timing)",
    )  # fmt: skip
    ap.add_argument("--steps-per-forward", type=int, default=None)
    ap.add_argument(
        "--select",
        type=float,
        nargs=2,
        default=None,
        metavar=("TOP", "SAMPLE"),
        help="also time the new configuration with a token selection (attribution.select_top/sample)",
    )
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

    t_pair = timed(paired, args.repeats, args.device)
    print(
        f"device={args.device} d={args.d} vocab={args.vocab} layers={args.layers} layer={args.layer} "
        f"batch={args.batch} seq={args.seq} tokens={n_tokens} threads={args.threads} repeats={args.repeats}"
    )
    print(
        f"paired forward              : {n_tokens / np.median(t_pair):8.1f} tokens/s  "
        f"(median {np.median(t_pair) * 1e3:.0f} ms, min-max {min(t_pair) * 1e3:.0f}-{max(t_pair) * 1e3:.0f})"
    )
    # (path, rule, steps, selection, reuse extraction's KL, precision, reuse its states): the old path, then
    # today's at 16 midpoint points, then today's with every --steps of --rule and every --precision, without and
    # with --select, the base stopping at the layer, and with --states neither model running unpatched.
    configs = [("full", "midpoint", 16, None, False, "float32", False)]
    configs.append(("upper", "midpoint", 16, None, False, "float32", False))
    for steps in args.steps:
        for precision in args.precision:
            for sel in [None] + ([tuple(args.select)] if args.select else []):
                for stored in [False] + ([True] if args.states else []):
                    configs.append(("upper", args.rule, steps, sel, True, precision, stored))
    with torch.no_grad():  # what extraction stores (extract.save_states), made once, outside the timings
        states, _ = paired_forward(base, ft, args.layer, ids_BT, mask_BT, torch.float32)
    known: dict[str, torch.Tensor] = {}
    for path, rule, steps, sel, reuse, precision, stored in configs:
        use_path(path)
        results = {}
        select = None if sel is None else Selection(sel[0], sel[1], list(range(args.batch)))
        kl_BT = known.get("kl") if reuse else None
        st = states if stored else None

        def attribute() -> None:
            # today's stage (diffsae.documents): documents missing 1 % get the Kronrod extension in the batch, and
            # those still missing it are attributed again with twice the points, in float32
            kronrod = MAX_REL_ERROR if reuse and 2 * steps + 1 <= MAX_STEPS else None
            results["last"] = attribute_batch(base, ft, args.layer, ids_BT, mask_BT, sae, steps=steps,
                                              steps_per_forward=args.steps_per_forward, rule=rule,
                                              select=select, kl_BT=kl_BT, max_rel_error=kronrod,
                                              noise_nats=NOISE_NATS, precision=precision, states=st)  # fmt: skip
            if reuse:
                results["final"], results["refined"] = refine(results["last"], steps)

        def refine(res: AttributionBatch, steps: int) -> tuple[np.ndarray, int]:
            err_B = completeness(res)
            rows = [b for b in range(args.batch) if err_B[b] > MAX_REL_ERROR and gap(res, b) > NOISE_NATS]
            results["kronrod"] = int((res.steps_B > steps).sum())
            refined = len(rows)
            while rows and 2 * steps <= MAX_STEPS:
                steps *= 2
                sub = Selection(sel[0], sel[1], rows) if sel is not None else None
                idx = torch.tensor(rows)
                again = attribute_batch(base, ft, args.layer, ids_BT[idx], mask_BT[idx], sae, steps=steps,
                                        steps_per_forward=args.steps_per_forward, rule=rule, select=sub,
                                        kl_BT=None if kl_BT is None else kl_BT[idx],
                                        states=None if st is None else States(*(t[idx] for t in st)))  # fmt: skip
                err_r = completeness(again)
                for i, b in enumerate(rows):
                    err_B[b] = min(err_B[b], err_r[i])
                rows = [b for i, b in enumerate(rows) if err_r[i] > MAX_REL_ERROR and gap(again, i) > NOISE_NATS]
            return err_B, refined

        t_attr = timed(attribute, args.repeats, args.device)
        res = results["last"]
        known.setdefault("kl", torch.from_numpy(np.nan_to_num(res.kl_BT)))  # what extraction stored
        err = completeness(res)
        ratios = sorted(t / np.median(t_pair) for t in t_attr)
        label = f"{path:5s} {rule:14s} {steps:2d} {precision:8s}" + (" kl reused, refined" if reuse else "")
        label += ", states stored" if stored else ""
        if sel is not None:
            share = np.nansum(res.weight_BT > 0) / np.nansum(res.weight_BT >= 0)
            label += f" select {sel[0]:g}/{sel[1]:g} ({share:.0%} of tokens weighted)"
        done = f"completeness max {err.max():.1e}"
        if reuse:
            done = (f"completeness max {err.max():.1e} with {results['kronrod']}/{args.batch} documents "
                    f"Kronrod-extended ({2 * steps + 1} points), {results['refined']} then doubled, max "
                    f"{results['final'].max():.1e}")  # fmt: skip
        print(
            f"attribution {label}: {n_tokens / np.median(t_attr):8.1f} tokens/s  "
            f"ratio {np.median(ratios):5.1f}x paired (min-max {ratios[0]:.1f}-{ratios[-1]:.1f})  {done}",
            flush=True,
        )
    use_path("upper")


if __name__ == "__main__":
    main()
