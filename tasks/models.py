"""Models, tokenizers and tokenized documents, loaded once per process through one explicit cache.

Task inputs name models and data by what the user gave (a hub id, a folder) or by their URL on the store (the
built-in pair, the uploaded prompts); `MODEL_CACHE` turns store URLs into local copies (the run context's mirror)
and keeps the loaded objects, so the shards, the training stage's KL-gap metric and the attribution stage of one
process load each model once. `MODEL_CACHE.clear()` frees them (tests, long-lived workers).
"""

from __future__ import annotations

from typing import Any

from diffsae.config import ModelsConfig
from diffsae.data import Doc, data_fingerprint, load_docs
from diffsae.models import ModelPair, load_pair
from diffsae.sources import resolve_models
from storage.context import RunContext
from storage.paths import is_s3


class ModelCache:
    """In-process cache of loaded model pairs, tokenizers, token strings and tokenized documents."""

    def __init__(self, max_pairs: int = 2) -> None:
        self.max_pairs = max_pairs
        self._pairs: dict[str, ModelPair] = {}
        self._tokenizers: dict[str, Any] = {}
        self._strings: dict[str, list[str]] = {}
        self._docs: dict[tuple[str, str, int, int | None], list[Doc]] = {}  # (sha256, tokenizer, ...)
        self.pair_loads = 0  # model pairs loaded by this cache (tests: a cached rerun loads none)
        self.pair_hits = 0  # requests served from the cache

    def clear(self) -> None:
        self._pairs.clear()
        self._tokenizers.clear()
        self._strings.clear()
        self._docs.clear()

    def pair(self, ctx: RunContext, models: ModelsConfig) -> ModelPair:
        """Both models (eval mode, on their device) and the finetuned tokenizer."""
        local = local_models(ctx, models)
        key = local.model_dump_json()
        if key not in self._pairs:
            while len(self._pairs) >= self.max_pairs:
                self._pairs.pop(next(iter(self._pairs)))
            self._pairs[key] = load_pair(local, needs_chat_template=False)
            self.pair_loads += 1
        else:
            self.pair_hits += 1
        return self._pairs[key]

    def tokenizer(self, ctx: RunContext, models: ModelsConfig) -> Any:
        """The finetuned model's tokenizer (the pair's, checked identical to the base's)."""
        path = str(local_models(ctx, models).finetuned)
        if path not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[path] = AutoTokenizer.from_pretrained(path)
        return self._tokenizers[path]

    def token_strings(self, ctx: RunContext, models: ModelsConfig) -> list[str]:
        """Each token id's text, as the tables show it."""
        path = str(local_models(ctx, models).finetuned)
        if path not in self._strings:
            tok = self.tokenizer(ctx, models)
            self._strings[path] = [tok.decode([i]) for i in range(len(tok))]
        return self._strings[path]

    def docs(
        self, ctx: RunContext, data: str, models: ModelsConfig, max_tokens: int, max_docs: int | None
    ) -> list[Doc]:
        """The prompts file `data` (a local file or a store URL), tokenized by the pair's tokenizer once per process
        and content (the preflight's tokenization of the user's file serves the flow's reading of its copy on the
        store)."""
        path = local_path(ctx, data)
        key = (data_fingerprint(path), str(local_models(ctx, models).finetuned), max_tokens, max_docs)
        if key not in self._docs:
            self._docs[key] = load_docs(path, self.tokenizer(ctx, models), max_tokens, max_docs)
        return self._docs[key]


MODEL_CACHE = ModelCache()


def local_path(ctx: RunContext, src: str) -> str:
    """A path transformers can open: an s3:// URL mirrored into the local cache; anything else unchanged."""
    return ctx.mirror(src) if is_s3(src) else src


def local_models(ctx: RunContext, models: ModelsConfig) -> ModelsConfig:
    """`models` as transformers loads them (for loading only: never stored or hashed): store URLs mirrored into the
    local cache, then .gguf files dequantized and LoRA adapters merged (`diffsae.sources`, cached on disk)."""
    assert models.base is not None and models.finetuned is not None
    mirrored = models.model_copy(
        update={"base": local_path(ctx, models.base), "finetuned": local_path(ctx, models.finetuned)}
    )
    return resolve_models(mirrored)
