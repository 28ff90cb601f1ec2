"""Per-token KL divergence of next-token distributions, KL(p ‖ q), from two sets of logits.

Used for the plain model-diffing signal `kl` = KL(p_ft,t ‖ p_base,t) and for the patched variants of the
KL attribution (see `diffsae.attribution`). Log-softmax is taken in float32 whatever the logits' dtype,
natural log. Large vocabularies (Gemma: 256k) make a [B, T, V] float32 copy expensive, so the work is
chunked over the sequence so that each chunk holds at most `chunk_elems` vocabulary entries; the function
stays differentiable (autograd works through the chunks, which the attribution relies on).

    kl_BT = kl_per_token(logits_ft_BTV, logits_base_BTV)   # float32 [B, T]

Run the tests with `pytest tests/test_attribution.py`.
"""

from __future__ import annotations

import torch

# At most this many float32 vocabulary entries per chunk (2**26 entries = 256 MiB per temporary).
DEFAULT_CHUNK_ELEMS = 1 << 26


def kl_chunk(logits_p_BTV: torch.Tensor, logits_q_BTV: torch.Tensor) -> torch.Tensor:
    logp_BTV = torch.log_softmax(logits_p_BTV.float(), dim=-1)
    logq_BTV = torch.log_softmax(logits_q_BTV.float(), dim=-1)
    p_BTV = logp_BTV.exp()
    # 0 · log 0 = 0: tokens with p = 0 (logit -inf) contribute nothing instead of NaN.
    terms_BTV = torch.where(p_BTV > 0, p_BTV * (logp_BTV - logq_BTV), torch.zeros_like(p_BTV))
    return terms_BTV.sum(dim=-1)  # [B, T]


def kl_per_token(
    logits_p_BTV: torch.Tensor, logits_q_BTV: torch.Tensor, chunk_elems: int = DEFAULT_CHUNK_ELEMS
) -> torch.Tensor:
    """KL(p ‖ q) at every position: float32 [B, T], with p = softmax(logits_p), q = softmax(logits_q).

    Any leading dims are allowed as long as the two shapes broadcast (e.g. p [1, B, T, V] against
    q [S, B, T, V]: one set of reference logits against several patched runs without copying it).
    """
    if logits_p_BTV.dim() < 2 or logits_q_BTV.dim() < 2:
        raise ValueError("expected [..., seq, vocab] logits")
    try:
        shape = torch.broadcast_shapes(logits_p_BTV.shape, logits_q_BTV.shape)
    except RuntimeError:
        raise ValueError(f"logits shapes differ: {tuple(logits_p_BTV.shape)} vs {tuple(logits_q_BTV.shape)}") from None
    T, V = shape[-2], shape[-1]
    rows = max(1, shape.numel() // max(1, T * V))  # product of the leading (batch) dims
    t_chunk = max(1, chunk_elems // max(1, rows * V))
    if t_chunk >= T:
        return kl_chunk(logits_p_BTV, logits_q_BTV)
    parts = [
        kl_chunk(logits_p_BTV[..., t0 : t0 + t_chunk, :], logits_q_BTV[..., t0 : t0 + t_chunk, :])
        for t0 in range(0, T, t_chunk)  # each [..., t_chunk]
    ]
    return torch.cat(parts, dim=-1)  # [..., T]


def kl_grad_logits_q(
    logits_p_BTV: torch.Tensor,
    logits_q_BTV: torch.Tensor,
    weight_BT: torch.Tensor,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """∂/∂logits_q of Σ_t weight_t · KL(p_t ‖ q_t), i.e. weight_t · (softmax(logits_q) − softmax(logits_p)).

    Closed form instead of autograd through `kl_per_token`: autograd would keep float32 copies of the
    log-softmax of every position (3 × [B, T, V] float32, ~6 GB for 8 × 256 Gemma tokens); this keeps one
    chunk's temporaries and returns the gradient in logits_q's dtype and shape (p broadcasts against q, as in
    `kl_per_token`; weight_BT broadcasts against the [..., T] positions).
    """
    out_BTV = torch.empty_like(logits_q_BTV)
    T, V = logits_q_BTV.shape[-2], logits_q_BTV.shape[-1]
    rows = max(1, logits_q_BTV.numel() // max(1, T * V))
    t_chunk = max(1, chunk_elems // max(1, rows * V))
    weight_BT = weight_BT.float()
    with torch.no_grad():
        for t0 in range(0, T, t_chunk):
            sl = slice(t0, t0 + t_chunk)
            q_BtV = torch.softmax(logits_q_BTV[..., sl, :].float(), dim=-1)
            p_BtV = torch.softmax(logits_p_BTV[..., sl, :].float(), dim=-1)
            out_BTV[..., sl, :] = (q_BtV - p_BtV) * weight_BT[..., sl, None]  # [..., t, V]
    return out_BTV
