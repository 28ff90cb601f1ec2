"""Checks that run before any compute: store reachable and writable, models compatible, data well-formed.

Each failure is one line (ConfigError, StoreError, PairError, DataError); nothing is written before they pass.
"""

from __future__ import annotations

from pathlib import Path

from diffsae.config import ConfigError, PipelineConfig
from storage.store import Store


def preflight(cfg: PipelineConfig) -> None:
    Store(cfg.store, cfg.s3_endpoint_url).check()
    if cfg.models is None or cfg.data is None:
        return  # the built-in pair is produced by the pipeline itself
    from diffsae.data import DataError, docs_have_messages
    from diffsae.models import check_pair

    if not Path(cfg.data.path).is_file():
        raise DataError(f"data file not found: {cfg.data.path}")
    check_pair(cfg.models, needs_chat_template=docs_have_messages(cfg.data.path))
    from tasks.extract import _docs

    # The same memoised tokenization the extraction plan reads: the dataset is tokenized once per process.
    docs = _docs(cfg.data.path, cfg.models.finetuned, cfg.data.max_tokens_per_doc, cfg.data.max_docs)
    if not docs:
        raise DataError(f"{cfg.data.path}: no documents")
    if cfg.extract.skip_first >= cfg.data.max_tokens_per_doc:
        raise ConfigError("extract.skip_first must be smaller than data.max_tokens_per_doc")
