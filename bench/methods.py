"""Diff-SAE against BatchTopK crosscoder on one built-in pair: KL gap recovered at matched width and L0, FVU, and
training wall time, both trained here on the same tokens in the same order (issue 17's comparison, first cut).

What: for a pair the pipeline has built into `--store` (the suite's runs: `bench/suite.py`), both models' residuals
at layer L are recomputed on the run's documents; on the documents the pipeline's SAE trained on (`fit`), a
diff-SAE (`diffsae.train.train_sae`, the run's SAE settings) and a crosscoder (`diffsae.crosscoder`, same width,
k, lr, batch size and steps) are trained on the same shuffled tokens; each one's inference threshold is set to
L0 = k on the calibration documents; then, on the validation documents (never trained on): the KL gap recovered,
1 − Σ KL(p_ft ‖ p_patch(h_base + d̂)) / Σ KL(p_ft ‖ p_patch(h_base)) (the crosscoder's d̂ = x̂_ft − x̂_base, seen
through `DiffView`), FVU of the diff, L0, and the crosscoder's latent-scaling ratios (how many latents the base
explains at less than 0.2 of the finetune's β: finetune-specific by the paper's reading).

Why: the seed's companion post reports 88 % of the KL gap for a diff-SAE against 60 % for a crosscoder; this
measures the same quantity on our pairs.

    python bench/methods.py --store /tmp/suite_sel --seed 0 --mix audit --width 2048 --k 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from diffsae import crosscoder as xc  # noqa: E402
from diffsae.config import PipelineConfig  # noqa: E402
from diffsae.methods import pair_residuals  # noqa: E402
from diffsae.models import load_pair  # noqa: E402
from diffsae.patching import kl_gap_recovered  # noqa: E402
from diffsae.split import sae_splits  # noqa: E402
from diffsae.train import calibrate_threshold, train_sae  # noqa: E402
from storage import activations as act  # noqa: E402
from storage.context import RunContext  # noqa: E402
from tasks.models import local_models  # noqa: E402
from tasks.pair import DemoPair, demo_key, demo_pair_url, resolved_inputs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix", default="audit")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name = f"{args.mix}-s{args.seed}-F{args.width}-k{args.k}"
    cfg = PipelineConfig.from_dict({
        "run": name, "store": args.store, "demo": {"seed": args.seed, "mix": args.mix},
        "sae": {"n_latents": args.width, "k": args.k},
    })  # fmt: skip
    ctx = RunContext.from_config(cfg)
    key = demo_key(cfg.demo)
    models, _ = resolved_inputs(cfg, DemoPair(key, demo_pair_url(ctx, key)))
    pair = load_pair(local_models(ctx, models), needs_chat_template=False)
    docs = act.read_docs(ctx.store, ctx.paths)
    if not docs:
        raise SystemExit(f"no finished activations stage for run {name} in {args.store}")
    layer, skip = cfg.models.layer, cfg.extract.skip_first
    pad = pair.tokenizer.pad_token_id or 0
    h = pair_residuals(pair.base, pair.finetuned, layer, docs, 2048, pair.device, skip, pad)
    splits = sae_splits(len(docs), cfg.sae)
    fit = torch.cat([h[int(d)] for d in splits["fit"]])  # [N, 2, D]
    cal = [h[int(d)] for d in splits["calibration"]]
    val_docs = [d for d in docs if d.doc_id in set(int(i) for i in splits["validation"])]
    n_steps = max(1, cfg.sae.train_tokens(len(fit)) // cfg.sae.batch_size)
    g = torch.Generator().manual_seed(cfg.sae.seed)
    epochs = n_steps * cfg.sae.batch_size // len(fit) + 1
    order = torch.cat([torch.randperm(len(fit), generator=g) for _ in range(epochs)])
    batches = [fit[order[i * cfg.sae.batch_size : (i + 1) * cfg.sae.batch_size]] for i in range(n_steps)]
    D = fit.shape[2]
    print(f"{name}: layer {layer}, {len(fit)} fit tokens, {n_steps} steps of {cfg.sae.batch_size}, "
          f"{len(cal)} calibration / {len(val_docs)} validation documents")  # fmt: skip

    t0 = time.perf_counter()
    sae = train_sae(cfg.sae, (b[:, 1] - b[:, 0] for b in batches), D, fit[:8192, 1] - fit[:8192, 0], n_steps,
                    device="cpu", progress=False).sae  # fmt: skip
    t_sae = time.perf_counter() - t0
    calibrate_threshold(sae, [c[:, 1] - c[:, 0] for c in cal], k=args.k)
    t0 = time.perf_counter()
    tr = xc.CrossCoderTrainer(D, args.width, args.k, fit[:8192], lr=cfg.sae.learning_rate, seed=cfg.sae.seed)
    for b in batches:
        tr.step(b)
    t_cc = time.perf_counter() - t0
    cc = tr.cc
    xc.calibrate_threshold(cc, cal, k=args.k)

    val = torch.cat([h[d.doc_id] for d in val_docs])
    diff = val[:, 1] - val[:, 0]
    with torch.no_grad():
        sae_acts = sae.encode(diff)
        cc_acts = cc.encode(val)
        sae_hat = sae.decode(sae_acts)
        cc_hat = cc.decode(cc_acts)
    centred = (diff - diff.mean(dim=0)).pow(2).sum()
    rows = []
    for label, dictionary, acts, hat, secs in (
        ("diff-SAE", sae, sae_acts, sae_hat, t_sae),
        ("crosscoder", xc.DiffView(cc), cc_acts, cc_hat[:, 1] - cc_hat[:, 0], t_cc),
    ):
        gap = kl_gap_recovered(pair.base, pair.finetuned, layer, dictionary, val_docs, pad, skip_first=skip)
        fvu = float((diff - hat).pow(2).sum() / centred)
        l0 = float((acts > 0).sum()) / len(val)
        rows.append(f"| {label} | {gap:.3f} | {fvu:.3f} | {l0:.1f} | {secs:.0f} |")
    ratios = xc.latent_scaling_ratios(cc, [val])
    fired = ratios.count > 0
    specific = fired & (ratios.nu_error.abs() < 0.2) & (ratios.nu_recon.abs() < 0.2)
    print("| method | KL gap recovered (validation docs) | FVU of the diff | L0 | training s |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"crosscoder latents firing on validation: {int(fired.sum())}; finetune-specific by latent scaling "
          f"(|nu_error| and |nu_recon| < 0.2): {int(specific.sum())}; median nu_error "
          f"{float(np.nanmedian(ratios.nu_error[fired].numpy())):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
