"""The activation-difference lens (ADL) of Minder et al. 2025, "Narrow finetuning leaves clearly readable traces in
activation differences" (issue 17, core): the mean of h_ft − h_base over the first few positions of ordinary
documents, read through the finetuned model's unembedding, and used as a direction like a latent's.

Why the first positions: there the finetune's narrow change shows up on any text, before the document's own
content dominates the residual. Position 0 (BOS, an attention sink with a huge norm) is left out by `skip_first`,
as everywhere in this package.

    delta_D = adl_direction([diff_nD for each document], first=5)          # [D], original units
    promoted, suppressed = adl_tokens(delta_D, finetuned, tokenizer, top_n=20)

Not yet a pipeline method (`methods: [..., adl]` is the issue's next step): these are the pieces it will call.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from diffsae.attribution import promoted_suppressed


def adl_direction(diffs: Sequence[Tensor], first: int = 5, skip_first: int = 1) -> Tensor:
    """Mean of the diffs at in-document positions skip_first .. skip_first + first − 1, pooled over documents
    (a document shorter than that gives what it has) [D], float32. Each element of `diffs` is one document [n, D]."""
    if first < 1:
        raise ValueError(f"adl first must be >= 1, got {first}")
    rows = [d[skip_first : skip_first + first].float() for d in diffs]
    rows = [r for r in rows if r.shape[0] > 0]
    if not rows:
        raise ValueError(f"no document has a position in [{skip_first}, {skip_first + first})")
    return torch.cat(rows).mean(dim=0)


def adl_tokens(delta_D: Tensor, finetuned: nn.Module, tokenizer: Any, top_n: int = 20) -> tuple[list[str], list[str]]:
    """The logit lens of the direction: the top_n tokens whose finetuned logit W_U · (γ ⊙ δ) it raises most and
    lowers most (γ: the final norm's gain; as `diffsae.attribution.promoted_suppressed` does for a latent)."""
    one = SimpleNamespace(W_dec_FD=delta_D.detach().float()[None], scale=torch.tensor(1.0))  # a one-row dictionary
    promoted, suppressed = promoted_suppressed(one, finetuned, tokenizer, top_n)
    return promoted[0], suppressed[0]
