"""Checks that run before any compute: store reachable and writable, models compatible, data well-formed.

Each failure is one line (ConfigError, StoreError, PairError, DataError); nothing is written before they pass.
"""

from __future__ import annotations

from pathlib import Path

from diffsae.config import ConfigError, PipelineConfig
from diffsae.data import DataError, docs_have_messages
from diffsae.models import check_pair
from storage.context import RunContext
from tasks.models import MODEL_CACHE


def preflight(cfg: PipelineConfig) -> None:
    ctx = RunContext.from_config(cfg)
    ctx.store.check()
    if cfg.uses_demo_pair or cfg.data is None:
        return  # the built-in pair is produced by the pipeline itself
    assert cfg.models.finetuned is not None
    if not Path(cfg.data.path).is_file():
        raise DataError(f"data file not found: {cfg.data.path}")
    if cfg.extract.skip_first >= cfg.data.max_tokens_per_doc:
        raise ConfigError("extract.skip_first must be smaller than data.max_tokens_per_doc")
    check_pair(cfg.models, needs_chat_template=docs_have_messages(cfg.data.path))
    # The same in-process tokenization the extraction plan reads: the dataset is tokenized once per process.
    docs = MODEL_CACHE.docs(ctx, cfg.data.path, cfg.models, cfg.data.max_tokens_per_doc, cfg.data.max_docs)
    if not docs:
        raise DataError(f"{cfg.data.path}: no documents")
