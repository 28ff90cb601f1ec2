"""BatchTopK crosscoder over the base and finetuned residuals, and Latent Scaling (issue 17, core).

A crosscoder (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model Diffing") reads both
models' residual at layer L and learns latents shared by the two, with one decoder per model; the BatchTopK variant
and Latent Scaling follow Minder, Dumas et al. 2025, "Overcoming Sparsity Artifacts in Crosscoders to Interpret
Chat-Tuning" (arXiv:2504.02922). With M = 2 models (0: base, 1: finetuned), inputs x_BMD multiplied by a fixed
per-model `scale_M` (unit mean squared norm on data, as the diff-SAE does):

    pre_BF  = Σ_m (x_s_BMD[:, m] − b_dec_MD[m]) @ W_enc_MDF[m] + b_enc_F
    v_BF    = relu(pre_BF) · n_F,   n_F = Σ_m ‖W_dec_FMD[:, m]‖          (what the top-k compares)
    acts_BF = relu(pre_BF) where v is kept: the k·B largest v of the batch (training), v > threshold (inference)
    x̂_BMD  = (acts_BF @ W_dec_FMD + b_dec_MD) / scale_M                    (per model, original units)

Decoder rows are not renormalised: their per-model norms are what tells a finetune-only latent (base norm ≈ 0)
from a shared one, and the top-k weighs activations by their sum so that shrinking one decoder does not buy
sparsity. A latent's direction in the diff space, the contract of the other pipeline stages, is
W_dec_FMD[:, 1] − W_dec_FMD[:, 0] in original units (`diff_directions_FD`).

Training (`CrossCoderTrainer.step`): loss = mse + auxk_alpha · auxk, mse = mean over tokens of Σ_m ‖x_s − x̂_s‖²;
AuxK as in diffsae.train (dead latents reconstruct the detached residual of both models, no bias); Adam; the
inference threshold is the bias-corrected EMA of the smallest kept v. Dense autograd: simple and exact, O(F·B·D)
per step (the diff-SAE's sparse CSR path is the place to look when this becomes the bottleneck).

Latent Scaling (`LatentScaling`): for latent j with activations f_ij and a direction d_j, the scalar β_j that best
explains targets y_ij by β f_ij d_j, β_j = argmin Σ_i ‖β f_ij d_j − y_ij‖² = Σ_i f_ij ⟨d_j, y_ij⟩ / (‖d_j‖² Σ_i f_ij²),
accumulated over batches. Targets are a per-token vector Y_i plus the latent's own contribution times a constant:
y_ij = Y_i + c f_ij o_j (e.g. the reconstruction without latent j: Y = x̂, o_j = its decoder row, c = −1), which
the closed form takes in as ⟨d_j, o_j⟩ Σ f_ij² — no [F, N, D] tensor. `latent_scaling_ratios` gives the paper's
ν^ε (reconstruction error) and ν^r (reconstruction) ratios base / finetuned along each latent's finetuned decoder:
near 0, the latent is specific to the finetune; near 1, the base carries it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from diffsae.sae import read_dictionary, write_dictionary
from diffsae.train import l0_cut

BASE, FT = 0, 1
ARCHITECTURE = "batchtopk_crosscoder"
_CORE_KEYS = ("architecture", "d_in", "n_latents", "k", "threshold")


class CrossCoder(nn.Module):
    """BatchTopK crosscoder on pairs of `d_in`-dim residuals, `n_latents` latents, mean L0 `k` (module docstring)."""

    def __init__(self, d_in: int, n_latents: int, k: int, seed: int = 0):
        super().__init__()
        if not 1 <= k <= n_latents:
            raise ValueError(f"need 1 <= k <= n_latents, got k={k}, n_latents={n_latents}")
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        self.W_enc_MDF = nn.Parameter(torch.empty(2, d_in, n_latents))
        self.b_enc_F = nn.Parameter(torch.zeros(n_latents))
        self.W_dec_FMD = nn.Parameter(torch.empty(n_latents, 2, d_in))
        self.b_dec_MD = nn.Parameter(torch.zeros(2, d_in))
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("scale_M", torch.ones(2))
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Decoder rows of norm 1/√2 per model (unit norm over both), encoder = decoder transpose, zero biases."""
        gen = torch.Generator().manual_seed(seed)
        W_FMD = torch.randn(self.n_latents, 2, self.d_in, generator=gen)
        W_FMD /= W_FMD.norm(dim=2, keepdim=True) * 2**0.5
        self.W_dec_FMD.copy_(W_FMD)
        self.W_enc_MDF.copy_(W_FMD.permute(1, 2, 0))
        self.b_enc_F.zero_()
        self.b_dec_MD.zero_()

    def decoder_norms_FM(self) -> Tensor:
        """‖W_dec_FMD[:, m]‖ per latent and model [F, 2]."""
        return self.W_dec_FMD.norm(dim=2)

    def weighted(self, relu_BF: Tensor) -> Tensor:
        """v_BF = relu(pre) · Σ_m ‖W_dec[:, m]‖: the decoder-weighted activations the top-k and threshold compare."""
        return relu_BF * self.decoder_norms_FM().sum(dim=1)

    def scaled(self, x_BMD: Tensor) -> Tensor:
        return x_BMD.to(self.W_enc_MDF.dtype) * self.scale_M[None, :, None]

    def pre_acts(self, x_s_BMD: Tensor) -> Tensor:
        """pre_BF from scaled inputs."""
        return torch.einsum("bmd,mdf->bf", x_s_BMD - self.b_dec_MD, self.W_enc_MDF) + self.b_enc_F

    def encode(self, x_BMD: Tensor) -> Tensor:
        """Inference encoder: relu(pre) where relu(pre) · n_F > threshold; acts [B, F] (scaled units)."""
        relu_BF = self.pre_acts(self.scaled(x_BMD)).relu()
        return relu_BF.masked_fill(self.weighted(relu_BF) <= self.threshold.clamp_min(0.0), 0.0)

    def decode_scaled(self, acts_BF: Tensor) -> Tensor:
        """x̂_s_BMD in scaled units."""
        return torch.einsum("bf,fmd->bmd", acts_BF, self.W_dec_FMD) + self.b_dec_MD

    def decode(self, acts_BF: Tensor) -> Tensor:
        """x̂_BMD in original units."""
        return self.decode_scaled(acts_BF) / self.scale_M[None, :, None]

    def forward(self, x_BMD: Tensor) -> Tensor:
        return self.decode(self.encode(x_BMD))

    def encode_train(self, x_BMD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_s_BMD, pre_BF, acts_BF): the k·B largest decoder-weighted activations of the batch kept (all positive
        ones if fewer), differentiable w.r.t. every parameter."""
        x_s_BMD = self.scaled(x_BMD)
        pre_BF = self.pre_acts(x_s_BMD)
        relu_BF = pre_BF.relu()
        with torch.no_grad():
            v_flat = self.weighted(relu_BF).reshape(-1)
            n_keep = min(self.k * x_BMD.shape[0], int((v_flat > 0).sum()))
            keep = torch.zeros_like(v_flat, dtype=torch.bool)
            keep[v_flat.topk(n_keep, sorted=False).indices] = True
        return x_s_BMD, pre_BF, relu_BF * keep.view_as(relu_BF)

    def save(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write `sae.safetensors` and `cfg.json` (architecture, sizes, threshold + `metadata`), as the diff-SAE."""
        core = {"architecture": ARCHITECTURE, "d_in": self.d_in, "n_latents": self.n_latents, "k": self.k,
                "threshold": float(self.threshold)}  # fmt: skip
        return write_dictionary(directory, self.state_dict(), core, metadata)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "CrossCoder":
        cfg, tensors = read_dictionary(directory, ARCHITECTURE)
        cc = cls(int(cfg["d_in"]), int(cfg["n_latents"]), int(cfg["k"]))
        cc.load_state_dict(tensors)
        cc.metadata = {key: value for key, value in cfg.items() if key not in _CORE_KEYS}  # type: ignore[assignment]
        return cc.to(device)

    def diff_directions_FD(self) -> Tensor:
        """Each latent's direction in the diff space (finetuned − base decoder), original units [F, D]."""
        W = self.W_dec_FMD.detach()
        return W[:, FT] / self.scale_M[FT] - W[:, BASE] / self.scale_M[BASE]


@torch.no_grad()
def calibrate_threshold(cc: CrossCoder, batches: list[Tensor], k: int) -> float:
    """Set the inference threshold so that the mean L0 over `batches` of pairs x_BMD is k (at most): the cut of
    `diffsae.train.l0_cut` over the decoder-weighted activations (as the diff-SAE's calibration does)."""
    t = l0_cut(lambda x: cc.weighted(cc.pre_acts(cc.scaled(x)).relu()), list(batches), cc.n_latents, k)
    cc.threshold.fill_(max(t, 0.0))
    return float(cc.threshold)


class DiffView(nn.Module):
    """A crosscoder seen in the diff space, where attribution, ranking and validation work (`diffsae.patching`'s
    SAELike): W_dec_FD = its diff directions, b_dec_D = b_ft / scale_ft − b_base / scale_base, scale 1, so that
    Σ_i a_i W_dec_FD[i] + b_dec_D = x̂_ft − x̂_base; activations come from both residuals (`encode_pair`)."""

    def __init__(self, cc: CrossCoder):
        super().__init__()
        self.cc = cc
        s_M = cc.scale_M.detach()
        self.register_buffer("W_dec_FD", cc.diff_directions_FD())
        self.register_buffer("b_dec_D", (cc.b_dec_MD[FT] / s_M[FT] - cc.b_dec_MD[BASE] / s_M[BASE]).detach())
        self.register_buffer("scale", torch.tensor(1.0))

    def encode_pair(self, x_NMD: Tensor) -> Tensor:
        return self.cc.encode(x_NMD)

    def encode(self, diff_ND: Tensor) -> Tensor:
        raise TypeError("a crosscoder reads both residuals: call encode_pair(x_NMD)")


class CrossCoderTrainer:
    """One training run: the crosscoder, Adam, dead-latent counters and the threshold EMA."""

    def __init__(
        self, d_in: int, n_latents: int, k: int, sample_NMD: Tensor, lr: float, auxk_alpha: float = 1 / 32,
        dead_tokens: int = 10_000_000, threshold_horizon: int = 1000, seed: int = 0,
    ) -> None:  # fmt: skip
        self.cc = CrossCoder(d_in, n_latents, k, seed=seed)
        sample_NMD = sample_NMD.float()
        with torch.no_grad():  # per model: scaled inputs have unit mean squared norm; b_dec starts at their mean
            self.cc.scale_M.copy_(sample_NMD.pow(2).sum(dim=2).mean(dim=0).clamp_min(1e-30).rsqrt())
            self.cc.b_dec_MD.copy_(sample_NMD.mean(dim=0) * self.cc.scale_M[:, None])
        self.optimizer = torch.optim.Adam(self.cc.parameters(), lr=lr, betas=(0.9, 0.999))
        self.auxk_alpha, self.dead_tokens, self.aux_k = auxk_alpha, dead_tokens, max(1, d_in)  # aux_k: 2·d_in / 2
        self.tokens_since_fired_F = torch.zeros(n_latents, dtype=torch.long)
        self.beta = 1.0 - 1.0 / threshold_horizon
        self._ema, self._n_ema, self.steps = 0.0, 0, 0

    def step(self, x_BMD: Tensor) -> dict[str, float]:
        cc = self.cc
        x_s_BMD, pre_BF, acts_BF = cc.encode_train(x_BMD.float())
        fired_F = (acts_BF > 0).any(dim=0)
        self.tokens_since_fired_F += x_BMD.shape[0]
        self.tokens_since_fired_F[fired_F] = 0
        dead_F = self.tokens_since_fired_F >= self.dead_tokens
        with torch.no_grad():  # the smallest kept decoder-weighted activation, with the norms that selected it
            kept = cc.weighted(acts_BF)[acts_BF > 0]
            min_kept = float(kept.min()) if kept.numel() else None
        err_BMD = x_s_BMD - cc.decode_scaled(acts_BF)
        mse = err_BMD.pow(2).sum(dim=(1, 2)).mean()
        auxk = self._auxk(pre_BF, err_BMD.detach(), dead_F)
        loss = mse + self.auxk_alpha * auxk
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if min_kept is not None:
            self._ema = self.beta * self._ema + (1 - self.beta) * min_kept
            self._n_ema += 1
            cc.threshold.fill_(self._ema / (1 - self.beta**self._n_ema))
        self.steps += 1
        centred = x_s_BMD - x_s_BMD.mean(dim=0)
        fvu = float(err_BMD.detach().pow(2).sum() / centred.detach().pow(2).sum().clamp_min(1e-30))
        l0 = float((acts_BF > 0).sum()) / x_BMD.shape[0]
        return {"loss": float(loss.detach()), "mse": float(mse.detach()), "auxk_loss": float(auxk.detach()), "fvu": fvu,
                "l0": l0,
                "dead_fraction": float(dead_F.float().mean())}  # fmt: skip

    def _auxk(self, pre_BF: Tensor, err_BMD: Tensor, dead_F: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024): the top aux_k dead latents per token reconstruct the residual (no bias)."""
        dead_K = torch.nonzero(dead_F).squeeze(1)
        if self.auxk_alpha == 0 or dead_K.numel() == 0:
            return torch.zeros(())
        top = pre_BF[:, dead_K].topk(min(self.aux_k, dead_K.numel()), dim=1)
        aux_BF = torch.zeros_like(pre_BF).scatter(1, dead_K[top.indices], top.values.relu())
        err_hat_BMD = torch.einsum("bf,fmd->bmd", aux_BF, self.cc.W_dec_FMD)
        num = (err_BMD - err_hat_BMD).pow(2).sum(dim=(1, 2)).mean()
        den = (err_BMD - err_BMD.mean(dim=0)).pow(2).sum(dim=(1, 2)).mean()
        return (num / den).nan_to_num(0.0, posinf=0.0, neginf=0.0)


def train_crosscoder(
    fit_NMD: Tensor, n_latents: int, k: int, batch_size: int, n_steps: int, lr: float, seed: int = 0,
    auxk_alpha: float = 1 / 32, dead_tokens: int = 10_000_000,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> CrossCoderTrainer:  # fmt: skip
    """`n_steps` steps on batches of `fit_NMD` rows drawn epoch by epoch in a seeded random order (every row once
    per epoch); the scales and b_dec start from the first 8,192 rows. Returns the trainer (its `.cc`)."""
    gen = torch.Generator().manual_seed(seed)
    tr = CrossCoderTrainer(fit_NMD.shape[2], n_latents, k, fit_NMD[:8192], lr=lr, auxk_alpha=auxk_alpha,
                           dead_tokens=dead_tokens, seed=seed)  # fmt: skip
    order = torch.empty(0, dtype=torch.long)
    for step in range(n_steps):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(fit_NMD), generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        metrics = tr.step(fit_NMD[idx])
        if on_step is not None:
            on_step(step, metrics)
    return tr


class LatentScaling:
    """Accumulates the closed-form β_j of Latent Scaling over batches (module docstring).

    update(acts_NF, Y_ND, own_FD, c): targets y_ij = Y_i + c · f_ij · own_j (own_FD None: y_ij = Y_i)."""

    def __init__(self, dirs_FD: Tensor):
        self.dirs_FD = dirs_FD.double()
        F = dirs_FD.shape[0]
        self.num_F = torch.zeros(F, dtype=torch.float64)  # Σ_i f_ij ⟨d_j, y_ij⟩
        self.sq_F = torch.zeros(F, dtype=torch.float64)  # Σ_i f_ij²
        self.count_F = torch.zeros(F, dtype=torch.long)  # tokens where the latent fires

    def update(self, acts_NF: Tensor, Y_ND: Tensor, own_FD: Tensor | None = None, c: float = 0.0) -> None:
        f_NF = acts_NF.double()
        sq_F = f_NF.pow(2).sum(dim=0)
        self.num_F += (f_NF * (Y_ND.double() @ self.dirs_FD.T)).sum(dim=0)  # Σ_i f_ij ⟨d_j, Y_i⟩
        if own_FD is not None and c != 0.0:
            self.num_F += c * (self.dirs_FD * own_FD.double()).sum(dim=1) * sq_F
        self.sq_F += sq_F
        self.count_F += (acts_NF != 0).sum(dim=0)

    def betas(self) -> Tensor:
        """β_j [F] (float64; NaN for a latent that never fired or has a zero direction)."""
        den_F = self.dirs_FD.pow(2).sum(dim=1) * self.sq_F
        return torch.where(den_F > 0, self.num_F / den_F.clamp_min(1e-300), torch.nan)


class ScalingRatios(NamedTuple):
    nu_error: Tensor  # [F] β^ε_base / β^ε_ft: how much of the latent the base's reconstruction error still needs
    nu_recon: Tensor  # [F] β^r_base / β^r_ft: how much the base's reconstruction (without it) carries it
    count: Tensor  # [F] firing tokens


@torch.no_grad()
def latent_scaling_ratios(cc: CrossCoder, batches: list[Tensor]) -> ScalingRatios:
    """ν^ε and ν^r of every latent along its finetuned decoder row, over `batches` of pairs x_BMD (scaled units).

    Error targets: y^m_ij = x_s^m − x̂_s^m + f_ij W_dec[j, m] (the residual with the latent's own part added back);
    reconstruction targets: y^m_ij = x̂_s^m − f_ij W_dec[j, m] (the reconstruction without it)."""
    dirs_FD = cc.W_dec_FMD[:, FT]
    acc = {(kind, m): LatentScaling(dirs_FD) for kind in ("error", "recon") for m in (BASE, FT)}
    for x_BMD in batches:
        x_s_BMD = cc.scaled(x_BMD)
        acts_BF = cc.encode(x_BMD)
        xhat_BMD = cc.decode_scaled(acts_BF)
        for m in (BASE, FT):
            own_FD = cc.W_dec_FMD[:, m]
            acc["error", m].update(acts_BF, x_s_BMD[:, m] - xhat_BMD[:, m], own_FD, 1.0)
            acc["recon", m].update(acts_BF, xhat_BMD[:, m], own_FD, -1.0)
    beta = {key: a.betas() for key, a in acc.items()}
    return ScalingRatios(
        beta["error", BASE] / beta["error", FT], beta["recon", BASE] / beta["recon", FT], acc["error", FT].count_F
    )
