"""Training loop and evaluation of the BatchTopK diff-SAE (`diffsae.sae.BatchTopKSAE`).

One step, on a batch x_BD in original units (all losses in scaled units, see `diffsae.sae`):
- batch top-k forward: the k * B largest post-ReLU pre-activations of the batch are kept;
- loss = mse + auxk_alpha * auxk, mse = mean over tokens of ||x_s - x_hat_s||^2;
- AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv:2406.04093, section A.2): latents
  that have not fired for `cfg.dead_tokens` tokens are dead; each token's residual e = x_s - x_hat_s
  (detached) is reconstructed, without decoder bias, from its top aux_k dead latents, aux_k = min(d_in // 2,
  n_dead) (the heuristic of Bussmann et al. 2024, appendix B.1, also used by dictionary_learning), and auxk =
  mean ||e - e_hat||^2 / mean ||e - mean(e)||^2;
- the gradient component parallel to each decoder row is removed, Adam (lr = cfg.learning_rate, betas 0.9/0.999) steps,
  and decoder rows are renormalised to unit norm;
- the inference threshold is a bias-corrected EMA of the smallest activation kept by the batch top-k, over a
  horizon of min(1000, total_steps // 10) steps (1000 steps = dictionary_learning's beta 0.999);
- after training, `calibrate_threshold` replaces it by the threshold at which the inference encoder's mean L0 over
  the tokens it is given is exactly k: the EMA of per-batch minima sits below the quantile the batch top-k selects (a
  batch's smallest kept value is its extreme, not its typical cut), so on real activations the EMA threshold gives
  L0 well above k (measured: 45.7 for k = 32 on the SmolLM2 organism). tasks/train.py calibrates on documents the
  SAE did not train on.

    result = train_sae(cfg.sae, batches, d_in=512, init_sample_ND=sample, total_steps=1000, on_step=log)
    calibrate_threshold(result.sae, calibration_batches, k=cfg.sae.k)  # documents held out of training
    metrics = evaluate(result.sae, val_batches)

Metrics are returned through `on_step(step, dict)` every `log_every` steps; `tasks/` forwards them to MLflow.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffsae.config import SAEConfig
from diffsae.sae import BatchTopKSAE, TrainForward, make_codes

OnStep = Callable[[int, dict[str, float]], None]


class TrainResult(NamedTuple):
    sae: BatchTopKSAE
    steps: int
    tokens: int
    final_train_metrics: dict[str, float]


class EvalMetrics(NamedTuple):
    fvu: float  # sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the whole set
    l0: float  # mean active latents per token (inference encoder)
    dead_fraction: float  # fraction of latents that never fired on the set
    mse: float  # mean over tokens of ||x - x_hat||^2 in scaled units (comparable with the training mse)
    n_tokens: int


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`auto` (or None): CUDA when available, else CPU."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def estimate_scale(sample_ND: Tensor) -> float:
    """Factor that gives `sample_ND * scale` unit mean squared norm (1.0 for an all-zero sample)."""
    msn = sample_ND.double().pow(2).sum(dim=1).mean().item()  # mean over rows of ||x||^2
    return 1.0 / msn**0.5 if msn > 0 else 1.0


class SAETrainer:
    """State of one training run: the SAE, Adam, dead-latent counters and the threshold EMA."""

    def __init__(
        self,
        cfg: SAEConfig,
        d_in: int,
        init_sample_ND: Tensor,
        total_steps: int,
        device: str | torch.device | None = None,
        aux_k: int | None = None,
        threshold_horizon: int | None = None,
    ):
        self.cfg = cfg
        self.device = resolve_device(device if device is not None else cfg.device)
        sae = BatchTopKSAE(d_in, cfg.n_latents, cfg.k, seed=cfg.seed)
        sample_ND = init_sample_ND.to(torch.float32)
        scale = estimate_scale(sample_ND)
        with torch.no_grad():
            sae.scale.fill_(scale)
            sae.b_dec_D.copy_(sample_ND.mean(dim=0) * scale)
        self.sae = sae.to(self.device)
        fused = True if self.device.type in ("cpu", "cuda") else None
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999), fused=fused)
        self.tokens_since_fired_F = torch.zeros(cfg.n_latents, dtype=torch.long, device=self.device)
        self.aux_k = aux_k if aux_k is not None else max(1, d_in // 2)
        horizon = threshold_horizon if threshold_horizon is not None else min(1000, max(1, total_steps // 10))
        self.threshold_beta = 1.0 - 1.0 / horizon
        self._ema = torch.zeros((), device=self.device)
        self._n_ema = 0
        self._hint = 0.0
        self._workspace: dict[str, Tensor] = {}  # scratch buffers reused across steps
        self.steps = 0
        self.tokens = 0

    def step(self, x_BD: Tensor) -> dict[str, Tensor]:
        """One optimisation step on a batch; returns the step's metrics as 0-dim tensors."""
        cfg, sae = self.cfg, self.sae
        x_BD = x_BD.to(self.device, torch.float32, non_blocking=True)
        n_tokens = x_BD.shape[0]
        fw = sae.encode_train(x_BD, hint=self._hint, workspace=self._workspace)

        # dead-latent counters are updated before AuxK: a latent that fires in this batch is alive
        self.tokens_since_fired_F += n_tokens
        self.tokens_since_fired_F[fw.codes.cols_N] = 0
        dead_F = self.tokens_since_fired_F >= cfg.dead_tokens  # [F]

        err_s_BD = fw.x_s_BD - fw.x_hat_s_BD  # [B,D]
        mse = err_s_BD.pow(2).sum(dim=1).mean()
        auxk = self._auxk_loss(fw, err_s_BD.detach(), dead_F)
        loss = mse + cfg.auxk_alpha * auxk

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # keep decoder rows on the unit sphere: project the gradient onto its tangent
            W_FD, g_FD = sae.W_dec_FD, sae.W_dec_FD.grad
            unit_FD = W_FD / W_FD.norm(dim=1, keepdim=True)
            g_FD -= (g_FD * unit_FD).sum(dim=1, keepdim=True) * unit_FD
        self.optimizer.step()
        sae.normalize_decoder()

        with torch.no_grad():
            if fw.vals_N.numel() > 0:
                min_kept = fw.vals_N.detach().min()
                self._ema.mul_(self.threshold_beta).add_((1.0 - self.threshold_beta) * min_kept)
                self._n_ema += 1
                sae.threshold.copy_(self._ema / (1.0 - self.threshold_beta**self._n_ema))
                self._hint = 0.8 * float(min_kept)  # next batch's top-k candidates (speed only)
            centred_BD = fw.x_s_BD - fw.x_s_BD.mean(dim=0)  # [B,D]
            fvu = err_s_BD.pow(2).sum() / centred_BD.pow(2).sum().clamp_min(1e-30)
        self.steps += 1
        self.tokens += n_tokens
        return {
            "loss": loss.detach(),
            "mse": mse.detach(),
            "fvu": fvu,
            "auxk_loss": auxk.detach(),
            "l0": torch.tensor(fw.vals_N.numel() / n_tokens),
            "dead_fraction": dead_F.float().mean(),
            "threshold": sae.threshold.clone(),
        }

    def _auxk_loss(self, fw: TrainForward, err_s_BD: Tensor, dead_F: Tensor) -> Tensor:
        dead_K = torch.nonzero(dead_F).squeeze(1)  # [K] dead latent ids
        if self.cfg.auxk_alpha == 0 or dead_K.numel() == 0:
            return torch.zeros((), device=self.device)
        n_tokens = err_s_BD.shape[0]
        k_aux = min(self.aux_k, dead_K.numel())
        top_vals_BA, top_j_BA = fw.pre_BF[:, dead_K].topk(k_aux, dim=1)  # [B,K] -> [B,A]
        keep_BA = top_vals_BA > 0  # relu: non-positive picks contribute nothing
        rows_BA = torch.arange(n_tokens, device=self.device)[:, None].expand(-1, k_aux)
        flat_N = (rows_BA[keep_BA] * self.sae.n_latents + dead_K[top_j_BA[keep_BA]]).sort().values
        if flat_N.numel() == 0:
            return torch.zeros((), device=self.device)
        codes = make_codes(flat_N, n_tokens, self.sae.n_latents)
        vals_N = self.sae.selected_pre(fw.x_s_BD, fw.pre_BF, codes)
        err_hat_BD = self.sae.decode_codes(vals_N, codes)  # no decoder bias
        num = (err_s_BD - err_hat_BD).pow(2).sum(dim=1).mean()
        den = (err_s_BD - err_s_BD.mean(dim=0)).pow(2).sum(dim=1).mean()
        return (num / den).nan_to_num(0.0, posinf=0.0, neginf=0.0)


def train_sae(
    cfg: SAEConfig,
    batches: Iterable[Tensor],
    d_in: int,
    init_sample_ND: Tensor,
    total_steps: int,
    device: str | torch.device | None = None,
    on_step: OnStep | None = None,
    progress: bool = True,
    log_every: int = 50,
    aux_k: int | None = None,
) -> TrainResult:
    """Train for `total_steps` batches (fewer if `batches` runs out) and return the SAE.

    `init_sample_ND` sets the input scale and the decoder bias. `on_step(step, metrics)` is called every
    `log_every` steps and after the last one, with loss, mse, fvu, auxk_loss, l0, dead_fraction (latents past
    cfg.dead_tokens tokens without firing), threshold and tokens_per_s (since the previous call, data wait
    included). `device` None means `cfg.device`."""
    if total_steps < 1 or log_every < 1:
        raise ValueError(f"total_steps and log_every must be >= 1, got {total_steps}, {log_every}")
    trainer = SAETrainer(cfg, d_in, init_sample_ND, total_steps, device=device, aux_k=aux_k)
    metrics: dict[str, float] = {}
    last_logged, last_time, last_tokens = 0, time.perf_counter(), 0
    stats: dict[str, Tensor] = {}

    def log() -> None:
        nonlocal metrics, last_logged, last_time, last_tokens
        now = time.perf_counter()
        metrics = {name: float(value) for name, value in stats.items()}
        metrics["tokens_per_s"] = (trainer.tokens - last_tokens) / max(now - last_time, 1e-9)
        last_logged, last_time, last_tokens = trainer.steps, now, trainer.tokens
        if on_step is not None:
            on_step(trainer.steps, metrics)
        bar.set_postfix(fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}", refresh=False)

    with tqdm(total=total_steps, disable=not progress, desc="diff-SAE", unit="step", dynamic_ncols=True) as bar:
        for x_BD in batches:
            stats = trainer.step(x_BD)
            if trainer.steps % log_every == 0:
                log()
            bar.update(1)
            if trainer.steps >= total_steps:
                break
        if trainer.steps == 0:
            raise ValueError("no training batches")
        if last_logged != trainer.steps:
            log()
    return TrainResult(trainer.sae, trainer.steps, trainer.tokens, metrics)


@torch.no_grad()
def evaluate(sae: BatchTopKSAE, batches: Iterable[Tensor]) -> EvalMetrics:
    """Reconstruction metrics of the inference encoder (global threshold) over all `batches`."""
    device = sae.W_dec_FD.device
    sse = torch.zeros((), dtype=torch.float64, device=device)
    sum_sq = torch.zeros((), dtype=torch.float64, device=device)
    sum_D = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    nnz = torch.zeros((), dtype=torch.long, device=device)
    fired_F = torch.zeros(sae.n_latents, dtype=torch.bool, device=device)
    n_tokens = 0
    for x_BD in batches:
        x_BD = x_BD.to(device, torch.float32)
        acts_BF = sae.encode(x_BD)
        active_BF = acts_BF > 0
        sse += (x_BD - sae.decode(acts_BF)).double().pow(2).sum()
        sum_sq += x_BD.double().pow(2).sum()
        sum_D += x_BD.double().sum(dim=0)
        nnz += active_BF.sum()
        fired_F |= active_BF.any(dim=0)
        n_tokens += x_BD.shape[0]
    if n_tokens == 0:
        raise ValueError("no evaluation batches")
    total_var = float(sum_sq) - float(sum_D.pow(2).sum()) / n_tokens
    return EvalMetrics(
        fvu=float(sse) / max(total_var, 1e-30),
        l0=float(nnz) / n_tokens,
        dead_fraction=1.0 - float(fired_F.float().mean()),
        mse=float(sse) * float(sae.scale) ** 2 / n_tokens,
        n_tokens=n_tokens,
    )


@torch.no_grad()
def calibrate_threshold(sae: BatchTopKSAE, batches: Iterable[Tensor], k: int, chunk_tokens: int = 1024) -> float:
    """Set `sae.threshold` so that the inference encoder keeps k latents per token on average over `batches`.

    The threshold is the (k * N + 1)-th largest post-ReLU pre-activation among the N tokens x F latents -- the cut the
    batch top-k would make if its batch were the whole set -- so `evaluate` on the same tokens gives L0 = k up to
    ties. Exact, in memory O(N * c): each token keeps its top c values (c = 4k, doubled until no token has a
    dropped value above the cut). Returns the threshold (scaled units)."""
    xs = [x for b in batches for x in b.to(sae.W_dec_FD.device, torch.float32).split(chunk_tokens)]
    sae.threshold.fill_(max(l0_cut(lambda x: sae.pre_acts(x).relu(), xs, sae.n_latents, k), 0.0))
    return float(sae.threshold)


def l0_cut(values: Callable[[Tensor], Tensor], xs: list[Tensor], n_latents: int, k: int) -> float:
    """The (k * N + 1)-th largest of `values(x)` ([n, n_latents] per chunk x) over the N tokens of the chunks `xs`:
    exactly k * N values lie strictly above it (the inference encoders keep values > threshold). Exact, in memory
    O(N * c): each token keeps its top c values (c = 4k, doubled until no token has a dropped value above the cut)."""
    n_tokens = sum(x.shape[0] for x in xs)
    if n_tokens == 0:
        raise ValueError("no calibration tokens")
    n_keep = k * n_tokens
    c = min(n_latents, 4 * k)
    while True:
        top_Nc = torch.cat([values(x).topk(c, dim=1).values for x in xs])  # [N, c], descending
        flat = top_Nc.flatten()
        cut = float(flat.kthvalue(flat.numel() - n_keep).values) if n_keep < flat.numel() else 0.0
        if c == n_latents or float(top_Nc[:, -1].max()) <= cut:
            return cut  # every value above the cut was kept
        c = min(n_latents, 2 * c)


@torch.no_grad()
def crossfit_l0(sae: BatchTopKSAE, docs: list[Tensor], k: int, seed: int) -> float:
    """Two-fold cross-fitted inference L0 over documents the SAE never trained on: the documents are split at random
    (seeded) into halves A and B; each half's tokens are encoded with the threshold `calibrate_threshold` sets on the
    other half, and the L0 is the mean number of active latents per token over both halves. `sae.threshold` is left
    as it was.

    Why: the mean L0 of one validation split of ~10 documents varies with which documents it holds far more than
    with the threshold (per-document L0 ranges 13-70 for k = 32 on the SmolLM2 organism; `bench/l0_calibration.py`:
    5-95 % range 0.71-1.46 k over random 12/12 splits), so it cannot tell whether calibration carries over to unseen
    documents; the cross-fitted mean uses every held-out document for both roles, once each, and can."""
    if len(docs) < 2:
        raise ValueError("cross-fitting needs at least two documents")
    saved = sae.threshold.clone()
    perm = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    halves = [[docs[i] for i in perm[: len(docs) // 2]], [docs[i] for i in perm[len(docs) // 2 :]]]
    active, n_tokens = 0, 0
    try:
        for fit, held in (halves, halves[::-1]):
            calibrate_threshold(sae, fit, k)
            for x in held:
                x = x.to(sae.W_dec_FD.device, torch.float32)
                active += int((sae.encode(x) > 0).sum())
                n_tokens += x.shape[0]
    finally:
        sae.threshold.copy_(saved)
    return active / max(n_tokens, 1)
