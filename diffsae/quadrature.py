"""Quadrature rules of the integrated-gradients path integral ∫₀¹ ∇KL(α) dα ≈ Σ_j w_j ∇KL(α_j).

- midpoint: α_j = (j + ½)/n, w_j = 1/n (exact for linear integrands, error O(n⁻²));
- gauss_legendre: the n-point Gauss–Legendre rule mapped to [0, 1] (exact for polynomials of degree 2n − 1);
- gauss_kronrod: the (2n + 1)-point Kronrod extension of the n-point Gauss rule (Kronrod 1965; Laurie 1997,
  "Calculation of Gauss-Kronrod quadrature rules"): the n Gauss nodes plus n + 1 new ones, with new weights on all
  of them, exact for polynomials of degree 3n + 1 (n even; 3n + 2 for n odd).

The Kronrod rule is how the attribution stage refines a document whose completeness misses the tolerance: its
gradients at the n Gauss nodes are already computed, so refining costs n + 1 more points instead of the 2n of
the next Gauss rule (`diffsae.attribution.attribute_batch`, `max_rel_error`).

    nodes, weights = quadrature("gauss_legendre", 4)
    gauss, w_gauss_in_k, new, w_new = kronrod(4)   # Σ w_gauss_in_k g(gauss) + Σ w_new g(new): the 9-point rule
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
from numpy.polynomial import legendre as L

Rule = Literal["midpoint", "gauss_legendre", "gauss_kronrod"]
KRONROD_MAX_N = 16  # the extension is computed in the Legendre basis; checked exact to 1e-12 up to here


def quadrature(rule: Rule, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes α_j in (0, 1) and weights w_j (Σ w_j = 1), ascending. For gauss_kronrod, `steps` is the Gauss rule's n
    and 2n + 1 nodes come back."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if rule == "midpoint":
        return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    if rule == "gauss_legendre":
        x, w = L.leggauss(steps)
        return (x + 1.0) / 2.0, w / 2.0
    if rule == "gauss_kronrod":
        g, wg, e, we = kronrod(steps)
        x, w = np.concatenate([g, e]), np.concatenate([wg, we])
        order = np.argsort(x)
        return x[order], w[order]
    raise ValueError(f"unknown quadrature rule {rule!r}: midpoint or gauss_legendre")


@lru_cache(maxsize=None)
def kronrod(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The Gauss–Kronrod extension of the n-point Gauss–Legendre rule on [0, 1]: (the n Gauss nodes, their Kronrod
    weights, the n + 1 new nodes, their weights); all weights sum to 1.

    The new nodes are the zeros of the Stieltjes polynomial E_{n+1} (degree n + 1, ∫ P_n E_{n+1} x^k dx = 0 for
    k ≤ n, Legendre weight on [-1, 1]); the weights make the 2n + 1 nodes integrate P_0 .. P_2n exactly. Both linear
    systems are posed in the Legendre basis, which keeps them well conditioned."""
    if not 1 <= n <= KRONROD_MAX_N:
        raise ValueError(f"Kronrod extension computed for 1 <= n <= {KRONROD_MAX_N}, got {n}")
    xg, _ = L.leggauss(n)
    p_n = np.zeros(n + 1)
    p_n[n] = 1.0

    def inner(a: np.ndarray, b: np.ndarray) -> float:  # ∫_{-1}^{1} a(x) b(x) dx of two Legendre series
        prod = L.legmul(a, b)
        return 2.0 * float(prod[0])  # ∫ P_m = 2 δ_m0

    # E = P_{n+1} + Σ_{i<=n} c_i P_i, orthogonal to P_n · P_k for k = 0..n
    rows, rhs = [], []
    for k in range(n + 1):
        basis_k = np.zeros(k + 1)
        basis_k[k] = 1.0
        pk = L.legmul(p_n, basis_k)
        rows.append([inner(pk, np.eye(n + 2)[i][: i + 1]) for i in range(n + 1)])
        rhs.append(-inner(pk, np.eye(n + 2)[n + 1]))
    c = np.linalg.solve(np.array(rows), np.array(rhs))
    e_series = np.concatenate([c, [1.0]])
    xe = np.sort(L.legroots(e_series).real)
    if not (np.all(np.abs(xe) < 1.0) and np.all(np.abs(L.legroots(e_series).imag) < 1e-12)):
        raise ValueError(f"no real Kronrod extension inside (-1, 1) for n = {n}")
    x = np.concatenate([xg, xe])
    V = L.legvander(x, 2 * n).T  # [2n+1 polynomials, 2n+1 nodes]
    moments = np.zeros(2 * n + 1)
    moments[0] = 2.0
    w = np.linalg.solve(V, moments)
    return (xg + 1.0) / 2.0, w[:n] / 2.0, (xe + 1.0) / 2.0, w[n:] / 2.0
