"""Models, tokenizers and tokenized documents, loaded once per process through one explicit cache.

Task inputs name models and data by what the user gave (a hub id, a folder) or by their URL on the store (the
built-in pair, the uploaded prompts); `MODEL_CACHE` turns store URLs into local copies (the run context's mirror)
and keeps the loaded objects, so the shards, the training stage's KL-gap metric and the attribution shards of one
process load each model once (and the attribution shards read the run's documents and SAE once).
`MODEL_CACHE.clear()` frees them (tests, long-lived workers).
"""

from __future__ import annotations

from typing import Any, Callable

from diffsae.config import ModelsConfig
from diffsae.data import Doc, data_fingerprint, load_docs
from diffsae.models import ModelPair, load_pair
from diffsae.sources import resolve_models
from storage import activations as act
from storage.context import RunContext
from storage.paths import is_s3


class ModelCache:
    """In-process cache of loaded model pairs, tokenizers, token strings, tokenized documents, and a run's stored
    documents and SAE."""

    def __init__(self, max_pairs: int = 2) -> None:
        self.max_pairs = max_pairs
        self._pairs: dict[str, ModelPair] = {}
        self._tokenizers: dict[str, Any] = {}
        self._strings: dict[str, list[str]] = {}
        self._docs: dict[tuple[str, str, int, int | None], list[Doc]] = {}  # (sha256, tokenizer, ...)
        self._run_docs: dict[tuple[str, str], dict[int, Doc]] = {}  # (run root, activations fingerprint)
        self._run_kls: dict[tuple[str, str], dict[int, Any]] = {}  # the same key: per-document KL arrays
        self._saes: dict[tuple[str, str], Any] = {}  # (SAE key/weights sha256, device)
        self.pair_loads = 0  # model pairs loaded by this cache (tests: a cached rerun loads none)
        self.pair_hits = 0  # requests served from the cache

    def clear(self) -> None:
        self._pairs.clear()
        self._tokenizers.clear()
        self._strings.clear()
        self._docs.clear()
        self._run_docs.clear()
        self._run_kls.clear()
        self._saes.clear()

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

    def run_docs(self, ctx: RunContext, fingerprint: str) -> dict[int, Doc]:
        """doc_id -> document of the run, as its activations stage (`fingerprint`) stored them
        (`storage.activations.read_docs`), read once per process: every attribution shard needs a few of them.
        Holds one run's documents at a time."""
        key = (ctx.paths.root, fingerprint)
        if key not in self._run_docs:
            self._run_docs.clear()
            self._run_docs[key] = {d.doc_id: d for d in act.read_docs(ctx.store, ctx.paths)}
        return self._run_docs[key]

    def run_kls(self, ctx: RunContext, fingerprint: str) -> dict[int, Any]:
        """doc_id -> extraction's per-token KL(p_ft ‖ p_base) (`storage.activations.read_doc_kls`), read once per
        process like `run_docs`: the attribution then stops the base model at the layer."""
        key = (ctx.paths.root, fingerprint)
        if key not in self._run_kls:
            self._run_kls.clear()
            self._run_kls[key] = act.read_doc_kls(ctx.store, ctx.paths)
        return self._run_kls[key]

    def sae(self, sae_key: str, weights_sha256: str, device: Any, load: Callable[[], Any]) -> Any:
        """The SAE of this stage key and weights on `device`, loaded by `load` once per process (a run's attribution
        shards share it). Holds one SAE at a time."""
        key = (f"{sae_key}/{weights_sha256}", str(device))
        if key not in self._saes:
            self._saes.clear()
            self._saes[key] = load()
        return self._saes[key]


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
