"""BatchTopK sparse autoencoder (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders",
arXiv:2412.06410).

The diff-SAE reconstructs `diff = h_finetuned - h_base`. Inputs are multiplied by a fixed `scale` (set from
data so that scaled inputs have unit mean squared norm) before encoding; latent activations and the inference
`threshold` live in those scaled units, `decode` returns original units:

    pre_BF   = (x_BD * scale - b_dec_D) @ W_enc_DF + b_enc_F
    acts_BF  = relu(pre_BF) * (pre_BF > threshold)              # inference: per token, global threshold
    x_hat_BD = (acts_BF @ W_dec_FD + b_dec_D) / scale

Training (`encode_train`) keeps instead the k * B largest post-ReLU pre-activations of the whole batch. The
training path is sparse end to end: the dense encoder matmul runs without autograd, the selected pairs are
held as CSR matrices (`Codes`), and two autograd functions compute exact gradients with sparse products (CSR @
dense and sampled dense-dense products), so the backward pass costs O(k B d) instead of O(F B d). Losses live
in `diffsae.train`. Pure torch: `BatchTopKSAE.load(dir)` is all a consumer needs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

ARCHITECTURE = "batchtopk"
_CORE_KEYS = ("architecture", "d_in", "n_latents", "k", "threshold", "scale")
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)


class Codes(NamedTuple):
    """N selected (token, latent) pairs of a [B, F] batch, indexed both ways as CSR."""

    rows_N: Tensor  # token of each pair, ascending (pairs sorted by token then latent)
    cols_N: Tensor  # latent of each pair
    crow_B1: Tensor  # CSR row pointers over tokens [B + 1]
    perm_N: Tensor  # order of the pairs sorted by (latent, token)
    ccol_F1: Tensor  # CSR row pointers of the transpose, over latents [F + 1]
    n_tokens: int
    n_latents: int


def make_codes(flat_N: Tensor, n_tokens: int, n_latents: int) -> Codes:
    """Codes from ascending flat indices `token * n_latents + latent`."""
    rows_N = torch.div(flat_N, n_latents, rounding_mode="floor")  # [N]
    cols_N = flat_N - rows_N * n_latents  # [N]
    crow_B1 = torch.zeros(n_tokens + 1, dtype=torch.long, device=flat_N.device)
    crow_B1[1:] = torch.bincount(rows_N, minlength=n_tokens).cumsum(0)
    perm_N = torch.argsort(cols_N * n_tokens + rows_N)  # [N]
    ccol_F1 = torch.zeros(n_latents + 1, dtype=torch.long, device=flat_N.device)
    ccol_F1[1:] = torch.bincount(cols_N, minlength=n_latents).cumsum(0)
    return Codes(rows_N, cols_N, crow_B1, perm_N, ccol_F1, n_tokens, n_latents)


def _csr_BF(c: Codes, vals_N: Tensor) -> Tensor:
    return torch.sparse_csr_tensor(c.crow_B1, c.cols_N, vals_N, (c.n_tokens, c.n_latents), check_invariants=False)


def _csr_FB(c: Codes, vals_N: Tensor) -> Tensor:
    return torch.sparse_csr_tensor(
        c.ccol_F1, c.rows_N[c.perm_N], vals_N[c.perm_N], (c.n_latents, c.n_tokens), check_invariants=False
    )


class _SelectedPre(torch.autograd.Function):
    """vals_N = pre_BF at the selected pairs, pre_BF = (x_s_BD - b_dec_D) @ W_enc_DF + b_enc_F.

    The values come precomputed (`pre_N`, from the no-grad dense matmul); backward is sparse."""

    @staticmethod
    def forward(ctx, x_s_BD, W_enc_DF, b_enc_F, b_dec_D, pre_N, codes: Codes):  # type: ignore[override]
        ctx.codes = codes
        ctx.save_for_backward(x_s_BD, W_enc_DF, b_dec_D)
        return pre_N.clone()

    @staticmethod
    def backward(ctx, g_N):  # type: ignore[override]
        x_s_BD, W_enc_DF, b_dec_D = ctx.saved_tensors
        c: Codes = ctx.codes
        g_b_enc_F = torch.zeros(c.n_latents, dtype=g_N.dtype, device=g_N.device).index_add_(0, c.cols_N, g_N)
        g_W_enc = g_b_dec = None
        if ctx.needs_input_grad[1]:
            g_W_enc = (_csr_FB(c, g_N) @ (x_s_BD - b_dec_D)).t().contiguous()  # [F,B]@[B,D] -> [D,F]
        if ctx.needs_input_grad[3]:
            g_b_dec = -(W_enc_DF @ g_b_enc_F)  # [D]
        return None, g_W_enc, g_b_enc_F, g_b_dec, None, None


class _SparseDecode(torch.autograd.Function):
    """out_BD = A_BF @ W_dec_FD with A_BF the CSR matrix of `vals_N` at `codes` (no bias)."""

    @staticmethod
    def forward(ctx, vals_N, W_dec_FD, codes: Codes):  # type: ignore[override]
        ctx.codes = codes
        ctx.save_for_backward(vals_N, W_dec_FD)
        return _csr_BF(codes, vals_N) @ W_dec_FD  # [B,F]@[F,D] -> [B,D]

    @staticmethod
    def backward(ctx, g_BD):  # type: ignore[override]
        vals_N, W_dec_FD = ctx.saved_tensors
        c: Codes = ctx.codes
        g_BD = g_BD.contiguous()
        g_vals = g_W_dec = None
        if ctx.needs_input_grad[0]:  # row-wise dots <g_BD[row], W_dec_FD[col]> at the selected pairs
            g_vals = torch.sparse.sampled_addmm(_csr_BF(c, vals_N), g_BD, W_dec_FD.t(), beta=0.0).values()
        if ctx.needs_input_grad[1]:
            g_W_dec = _csr_FB(c, vals_N) @ g_BD  # [F,B]@[B,D] -> [F,D]
        return g_vals, g_W_dec, None


class TopK(NamedTuple):
    flat_N: Tensor  # ascending flat indices token * F + latent
    vals_N: Tensor  # the values there


def batch_topk(pre_BF: Tensor, n_keep: int, hint: float = 0.0, mask_buf: Tensor | None = None) -> TopK:
    """The `n_keep` largest positive entries of `pre_BF` (all positives if fewer), by ascending flat index.

    Exact for any `hint`: entries above `hint` (a guess of the n_keep-th value, e.g. the previous batch's) are
    the candidates when there are at least n_keep of them; otherwise the bound is lowered to hint / 4, then 0.
    This avoids a top-k over all B * F entries, the dominant cost of a naive implementation on CPU.
    `mask_buf` (bool, B * F) is reused scratch memory."""
    flat = pre_BF.reshape(-1)  # [B*F]
    bounds = [hint, hint / 4, 0.0] if hint > 0 else [0.0]
    for bound in bounds:
        mask = torch.gt(flat, bound, out=mask_buf) if mask_buf is not None else flat > bound  # [B*F]
        cand_M = torch.nonzero(mask).squeeze(1)  # [M], ascending
        if cand_M.numel() >= n_keep:
            break
    vals_M = flat[cand_M]  # [M]
    if cand_M.numel() > n_keep:
        top = vals_M.topk(n_keep, sorted=False)
        order = top.indices.sort().values  # back to ascending flat index
        cand_M, vals_M = cand_M[order], vals_M[order]
    return TopK(cand_M, vals_M)


def _scratch(
    workspace: dict[str, Tensor] | None,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    if workspace is None:
        return None
    buf = workspace.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
        buf = workspace[name] = torch.empty(shape, dtype=dtype, device=device)
    return buf


class TrainForward(NamedTuple):
    x_s_BD: Tensor  # scaled input
    pre_BF: Tensor  # dense pre-activations (no grad), for AuxK
    codes: Codes  # the batch top-k selection
    vals_N: Tensor  # selected activations (grad), scaled units
    x_hat_s_BD: Tensor  # reconstruction in scaled units (grad)


class BatchTopKSAE(nn.Module):
    """BatchTopK SAE on `d_in`-dim inputs with `n_latents` latents and mean L0 `k` (see module docstring)."""

    def __init__(self, d_in: int, n_latents: int, k: int, seed: int = 0):
        super().__init__()
        if not 1 <= k <= n_latents:
            raise ValueError(f"need 1 <= k <= n_latents, got k={k}, n_latents={n_latents}")
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        self.metadata: dict[str, Any] = {}  # extra cfg.json keys read by `load`
        self.W_enc_DF = nn.Parameter(torch.empty(d_in, n_latents))
        self.b_enc_F = nn.Parameter(torch.zeros(n_latents))
        self.W_dec_FD = nn.Parameter(torch.empty(n_latents, d_in))
        self.b_dec_D = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("scale", torch.tensor(1.0))
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Random unit-norm decoder rows, encoder = decoder transpose, zero biases."""
        gen = torch.Generator().manual_seed(seed)
        W_FD = torch.randn(self.n_latents, self.d_in, generator=gen)
        W_FD /= W_FD.norm(dim=1, keepdim=True)
        self.W_dec_FD.copy_(W_FD)
        self.W_enc_DF.copy_(W_FD.t())
        self.b_enc_F.zero_()
        self.b_dec_D.zero_()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec_FD /= self.W_dec_FD.norm(dim=1, keepdim=True)

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """Pre-activations [B, F] in scaled units; x in original units."""
        x_s_BD = x_BD.to(self.W_enc_DF.dtype) * self.scale
        return torch.addmm(self.b_enc_F, x_s_BD - self.b_dec_D, self.W_enc_DF)  # [B,D]@[D,F] -> [B,F]

    def encode(self, x_BD: Tensor) -> Tensor:
        """Inference encoder: per token relu(pre) * (pre > threshold); acts [B, F] in scaled units."""
        pre_BF = self.pre_acts(x_BD)
        return pre_BF.masked_fill(pre_BF <= self.threshold.clamp_min(0.0), 0.0)  # [B,F]

    def decode(self, acts_BF: Tensor) -> Tensor:
        """Reconstruction [B, D] in original units."""
        return torch.addmm(self.b_dec_D, acts_BF, self.W_dec_FD) / self.scale  # [B,F]@[F,D] -> [B,D]

    def forward(self, x_BD: Tensor) -> Tensor:
        return self.decode(self.encode(x_BD))

    def encode_train(self, x_BD: Tensor, hint: float = 0.0, workspace: dict[str, Tensor] | None = None) -> TrainForward:
        """Training forward: keep the k * B largest post-ReLU pre-activations across the batch.

        `hint` is a guess of the smallest kept value (speed only, see `batch_topk`); `workspace` keeps the
        large scratch tensors between calls (fresh 32 MB allocations cost page faults on CPU)."""
        n_tokens = x_BD.shape[0]
        x_s_BD = x_BD.to(self.W_enc_DF.dtype) * self.scale
        with torch.no_grad():
            xc_BD = x_s_BD - self.b_dec_D
            pre_out = _scratch(workspace, "pre_BF", (n_tokens, self.n_latents), xc_BD.dtype, xc_BD.device)
            pre_BF = torch.mm(xc_BD, self.W_enc_DF, out=pre_out) if pre_out is not None else xc_BD @ self.W_enc_DF
            pre_BF.add_(self.b_enc_F)  # [B,D]@[D,F] + [F] -> [B,F]
            mask = _scratch(workspace, "mask", (n_tokens * self.n_latents,), torch.bool, xc_BD.device)
            top = batch_topk(pre_BF, self.k * n_tokens, hint, mask)
        codes = make_codes(top.flat_N, n_tokens, self.n_latents)
        vals_N = self.selected_pre(x_s_BD, pre_BF, codes, top.vals_N)
        x_hat_s_BD = self.decode_codes(vals_N, codes) + self.b_dec_D  # [B,D]
        return TrainForward(x_s_BD, pre_BF, codes, vals_N, x_hat_s_BD)

    def selected_pre(self, x_s_BD: Tensor, pre_BF: Tensor, codes: Codes, pre_N: Tensor | None = None) -> Tensor:
        """Pre-activations at `codes` [N] (`pre_N` if already gathered), differentiable w.r.t. W_enc, b_enc,
        b_dec."""
        if pre_N is None:
            pre_N = pre_BF.reshape(-1)[codes.rows_N * self.n_latents + codes.cols_N]  # [N]
        return _SelectedPre.apply(x_s_BD, self.W_enc_DF, self.b_enc_F, self.b_dec_D, pre_N, codes)

    def decode_codes(self, vals_N: Tensor, codes: Codes) -> Tensor:
        """Sparse activations @ W_dec [B, D] (scaled units, no bias), differentiable w.r.t. vals and W_dec."""
        return _SparseDecode.apply(vals_N, self.W_dec_FD, codes)

    def save(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write `sae.safetensors` and `cfg.json` (architecture, sizes, threshold, scale + `metadata`)."""
        core = {"architecture": ARCHITECTURE, "d_in": self.d_in, "n_latents": self.n_latents, "k": self.k,
                "threshold": float(self.threshold), "scale": float(self.scale)}  # fmt: skip
        return write_dictionary(directory, self.state_dict(), core, metadata)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "BatchTopKSAE":
        cfg, tensors = read_dictionary(directory, ARCHITECTURE)
        sae = cls(int(cfg["d_in"]), int(cfg["n_latents"]), int(cfg["k"]))
        sae.load_state_dict(tensors)
        sae.metadata = {key: value for key, value in cfg.items() if key not in _CORE_KEYS}
        return sae.to(device)


def write_dictionary(
    directory: str | Path, tensors: dict[str, Tensor], core: dict[str, Any], metadata: dict[str, Any] | None
) -> Path:
    """The files every method's dictionary is saved as (diffsae/methods.py): `sae.safetensors` (`tensors`) and
    `cfg.json` (`core`: architecture, sizes, ... then `metadata`, which must not override a core key)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    clash = sorted(set(metadata or {}) & set(core))
    if clash:
        raise ValueError(f"metadata must not override {clash}")
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(out / "sae.safetensors"))
    (out / "cfg.json").write_text(json.dumps({**core, **(metadata or {})}, indent=2) + "\n")
    return out


def read_dictionary(directory: str | Path, architecture: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(cfg.json, the tensors on the CPU) of a dictionary saved by `write_dictionary`; its architecture is checked."""
    src = Path(directory)
    cfg = json.loads((src / "cfg.json").read_text())
    if cfg.get("architecture") != architecture:
        raise ValueError(f"{src / 'cfg.json'}: architecture {cfg.get('architecture')!r}, want {architecture!r}")
    return cfg, load_file(str(src / "sae.safetensors"), device="cpu")
