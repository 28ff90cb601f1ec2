"""Model-diffing methods behind one contract: every method turns a run's activations into *entries* -- latents or
directions -- that the attribution, ranking, validation, SQL and dashboards stages read the same way (issue 17).

The contract is `diffsae.patching.SAELike` seen in the diff space h_ft − h_base at layer L: `W_dec_FD` (one
direction per entry), `b_dec_D`, `scale`, and per-token activations from `encode(diff_ND)` -- or from
`encode_pair(x_NMD)` for a dictionary that reads both residuals (the crosscoder) -- such that
Σ_i a_i W_dec_FD[i] / scale + b_dec_D / scale is the method's reconstruction of the diff. Three methods:

- `diff_sae`: the BatchTopK SAE on the diff (diffsae/sae.py), the default.
- `crosscoder`: a BatchTopK crosscoder on both residuals (diffsae/crosscoder.py) seen through `DiffView`:
  directions = finetuned − base decoder rows.
- `adl`: the activation-difference lens (diffsae/adl.py) as a one-entry dictionary, `DirectionDict`: the unit
  direction δ̂ of the mean diff over the first positions of the documents; its activation on a token is the diff's
  positive component along it, a = max(0, ⟨diff, δ̂⟩), and its reconstruction a·δ̂ (so attribution gives the share
  of KL(p_ft ‖ p_base) that the diff's component along δ̂ explains, and ablation removes that component).

Each method saves its dictionary as `sae.safetensors` + `cfg.json` with its own `architecture`; `load_dictionary`
reads any of them back as an SAELike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from diffsae import crosscoder as xc
from diffsae.data import Doc
from diffsae.extract import extract_docs
from diffsae.sae import ARCHITECTURE as SAE_ARCHITECTURE
from diffsae.sae import BatchTopKSAE, read_dictionary, write_dictionary

METHODS = ("diff_sae", "crosscoder", "adl")
DIRECTION_ARCHITECTURE = "direction"


class DirectionDict(nn.Module):
    """Fixed unit directions as a dictionary (SAELike): a_i = max(0, ⟨diff, d̂_i⟩), reconstruction Σ_i a_i d̂_i, no
    bias. `direction_FD` rows are normalised; a zero row is refused."""

    def __init__(self, direction_FD: Tensor):
        super().__init__()
        norms_F = direction_FD.float().norm(dim=1, keepdim=True)
        if not bool((norms_F > 0).all()):
            raise ValueError("a direction of norm 0 has no orientation")
        self.n_latents, self.d_in = direction_FD.shape
        self.register_buffer("W_dec_FD", direction_FD.float() / norms_F)
        self.register_buffer("b_dec_D", torch.zeros(self.d_in))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("threshold", torch.tensor(0.0))
        self.metadata: dict[str, Any] = {}

    def encode(self, diff_ND: Tensor) -> Tensor:
        return (diff_ND.to(self.W_dec_FD.dtype) @ self.W_dec_FD.T).relu()

    def decode(self, acts_NF: Tensor) -> Tensor:
        return acts_NF @ self.W_dec_FD

    def save(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        core = {"architecture": DIRECTION_ARCHITECTURE, "d_in": self.d_in, "n_latents": self.n_latents, "k": 1}
        return write_dictionary(directory, {"W_dec_FD": self.W_dec_FD}, core, metadata)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "DirectionDict":
        cfg, tensors = read_dictionary(directory, DIRECTION_ARCHITECTURE)
        out = cls(tensors["W_dec_FD"])
        out.metadata = {k: v for k, v in cfg.items() if k not in ("architecture", "d_in", "n_latents", "k")}
        return out.to(device)


def load_dictionary(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Any method's saved dictionary (by its cfg.json `architecture`) as an SAELike in the diff space."""
    arch = json.loads((Path(directory) / "cfg.json").read_text()).get("architecture")
    if arch == SAE_ARCHITECTURE:
        return BatchTopKSAE.load(directory, device=device)
    if arch == xc.ARCHITECTURE:
        return xc.DiffView(xc.CrossCoder.load(directory, device=device))
    if arch == DIRECTION_ARCHITECTURE:
        return DirectionDict.load(directory, device=device)
    raise ValueError(f"{Path(directory) / 'cfg.json'}: unknown architecture {arch!r}")


def encode_tokens(dictionary: nn.Module, h_ft_ND: Tensor, h_base_ND: Tensor) -> Tensor:
    """Activations [N, F] of any method's dictionary at tokens with residuals h_ft, h_base (original units)."""
    W = dictionary.W_dec_FD
    if hasattr(dictionary, "encode_pair"):
        return dictionary.encode_pair(torch.stack([h_base_ND, h_ft_ND], dim=1).to(W.device, torch.float32))
    return dictionary.encode((h_ft_ND - h_base_ND).to(W.device, W.dtype))


def pair_residuals(
    base: nn.Module, finetuned: nn.Module, layer: int, docs: Sequence[Doc], batch_tokens: int,
    device: torch.device, skip_first: int, pad_id: int,
) -> dict[int, Tensor]:  # fmt: skip
    """Per document: both models' residuals [n, 2, D] (base, finetuned; float32) at the positions that are SAE data
    (>= skip_first), from extraction's own paired forward (`diffsae.extract.extract_docs`, raw activations kept)."""
    out: dict[int, list[Tensor]] = {}
    for b in extract_docs(base, finetuned, layer, docs, batch_tokens, device, store_dtype="float32",
                          skip_first=skip_first, save_raw=True, pad_id=pad_id):  # fmt: skip
        keep = b.in_sae_N
        h = torch.from_numpy(np.stack([b.base_ND[keep], b.ft_ND[keep]], axis=1))  # [n, 2, D]
        for doc in np.unique(b.doc_id_N[keep]):
            out.setdefault(int(doc), []).append(h[b.doc_id_N[keep] == doc])
    return {doc: torch.cat(parts) for doc, parts in out.items()}
