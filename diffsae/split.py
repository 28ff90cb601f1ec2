"""Which documents the diff-SAE trains on: a seeded split by document, never by token.

    train, validation = split_docs(n_docs, cfg.val_fraction, cfg.seed)     # validation: SAE metrics
    fit, calibration = split_calibration(train, cfg.calibration_fraction, cfg.seed)  # calibration: its threshold
    held = heldout_docs(n_docs, cfg)                                          # never seen by SAE training

The training stage (tasks/train.py) draws the split; the rank stage redraws it from the SAE's config to judge
recovery on documents held out of SAE training (storage/sql/recovery_v2.sql, issue 15 part 1).
"""

from __future__ import annotations

import numpy as np

from diffsae.config import SAEConfig


def split_docs(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train doc ids, validation doc ids): a seeded random split by document, at least one of each."""
    rng = np.random.default_rng(seed + 7919)
    is_val = rng.random(n_docs) < val_fraction
    if n_docs >= 2 and (is_val.all() or not is_val.any()):
        is_val[:] = False
        is_val[rng.integers(n_docs)] = True
    ids = np.arange(n_docs)
    return ids[~is_val], ids[is_val]


def split_calibration(train_docs: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(SAE training docs, calibration docs) out of the training split: a seeded random share `fraction` of its
    documents (at least one, while one is left to train on); fraction 0: every document does both."""
    if fraction <= 0 or len(train_docs) < 2:
        return train_docs, train_docs
    is_cal = np.random.default_rng(seed + 104729).random(len(train_docs)) < fraction
    if not is_cal.any():
        is_cal[0] = True
    if is_cal.all():
        is_cal[0] = False
    return train_docs[~is_cal], train_docs[is_cal]


def sae_splits(n_docs: int, cfg: SAEConfig) -> dict[str, np.ndarray]:
    """Doc ids per role in SAE training: `fit` (its training data), `calibration`, `validation`."""
    train, validation = split_docs(n_docs, cfg.val_fraction, cfg.seed)
    fit, calibration = split_calibration(train, cfg.calibration_fraction, cfg.seed)
    return {"fit": fit, "calibration": calibration, "validation": validation}


def heldout_docs(n_docs: int, cfg: SAEConfig) -> np.ndarray:
    """Sorted doc ids the SAE never trained on (validation and calibration documents)."""
    s = sae_splits(n_docs, cfg)
    return np.setdiff1d(np.arange(n_docs), s["fit"])
