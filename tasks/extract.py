"""Stage 1 tasks: one cached task per activation shard, then a commit task that writes the manifest last.

A shard's cache key is its content key (model fingerprints, layer, model dtype, the shard's token ids and roles,
the extract settings that change the output) + the task source. A killed run restarted recomputes only the shards
whose file is missing or fails its sidecar check (size + sha256); the manifest is written only when every shard
is in place, so a reader never sees a partial stage.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any, NamedTuple

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from tqdm import tqdm

from diffsae.config import ExtractConfig, ModelsConfig
from diffsae.data import Doc, load_docs
from diffsae.extract import extract_docs
from storage import activations as act
from storage.paths import RunPaths
from storage.store import Store
from tasks.common import IO_RETRY, stable_hash


class ShardSpec(NamedTuple):
    index: int
    doc_start: int
    doc_end: int
    n_tokens: int
    key: str


class ExtractPlan(NamedTuple):
    shards: list[ShardSpec]
    n_docs: int
    n_tokens: int
    data_key: str


# ---------------------------------------------------------------- in-process caches (models load once per worker)


@lru_cache(maxsize=2)
def _pair(models_json: str) -> Any:
    from diffsae.models import load_pair

    return load_pair(ModelsConfig.model_validate_json(models_json), needs_chat_template=False)


@lru_cache(maxsize=2)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@lru_cache(maxsize=2)
def _docs(data_path: str, tokenizer_src: str, max_tokens: int, max_docs: int | None) -> list[Doc]:
    return load_docs(data_path, _tokenizer(tokenizer_src), max_tokens, max_docs)


@lru_cache(maxsize=2)
def _token_strings(tokenizer_src: str) -> list[str]:
    tok = _tokenizer(tokenizer_src)
    return [tok.decode([i]) for i in range(len(tok))]


# ------------------------------------------------------------------------------------------------- planning


def plan_extraction(
    models: ModelsConfig,
    data_path: str,
    max_tokens: int,
    max_docs: int | None,
    extract: ExtractConfig,
    fingerprints: tuple[str, str],
) -> ExtractPlan:
    """Tokenize the dataset (tokenizer only, no model) and cut it into shards of ~extract.shard_tokens tokens."""
    docs = _docs(data_path, models.finetuned, max_tokens, max_docs)
    settings = {
        "layer": models.layer,
        "model_dtype": models.dtype,
        "dtype": extract.dtype,
        "skip_first": extract.skip_first,
        "save_raw": extract.save_raw,
        "models": fingerprints,
    }
    shards: list[ShardSpec] = []
    start, n = 0, 0
    for i, d in enumerate(docs):
        n += len(d.token_ids)
        if n >= extract.shard_tokens or i == len(docs) - 1:
            content = [(x.doc_id, x.token_ids, x.roles) for x in docs[start : i + 1]]
            shards.append(ShardSpec(len(shards), start, i + 1, n, stable_hash(settings, content)))
            start, n = i + 1, 0
    total = sum(s.n_tokens for s in shards)
    return ExtractPlan(shards, len(docs), total, stable_hash(settings, [s.key for s in shards]))


class ShardCtx(NamedTuple):
    """How to compute a shard (not part of its cache key: `key` already says what the output depends on)."""

    models_json: str
    data_path: str
    max_tokens: int
    max_docs: int | None
    extract_json: str
    n_shards: int


def shard_ok(store: Store, paths: RunPaths, spec: ShardSpec, verify: str = "checksum") -> bool:
    return act.shard_valid(store, paths, act.read_sidecar(store, paths, spec.index), spec.key, verify)


@task(
    name="extract-shard",
    cache_policy=(INPUTS - "ctx") + TASK_SOURCE,
    **IO_RETRY,
    task_run_name="extract-shard-{spec.index}",
)
def extract_shard(store_root: str, run: str, spec: ShardSpec, ctx: ShardCtx) -> dict[str, Any]:
    """Run both models over the shard's documents and write the shard (+ sidecar) atomically."""
    import torch

    paths, store = RunPaths(store_root, run), Store(store_root)
    models = ModelsConfig.model_validate_json(ctx.models_json)
    extract = ExtractConfig.model_validate_json(ctx.extract_json)
    pair = _pair(ctx.models_json)
    docs = _docs(ctx.data_path, models.finetuned, ctx.max_tokens, ctx.max_docs)[spec.doc_start : spec.doc_end]
    d_model = int(pair.base.config.get_text_config().hidden_size)
    schema = act.shard_schema(d_model, extract.dtype, extract.save_raw)
    writer = act.ShardWriter(store, paths, spec.index, schema, _token_strings(models.finetuned))
    pad_id = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[models.dtype]
    t0 = time.perf_counter()
    bar = tqdm(
        total=spec.n_tokens, unit="tok", unit_scale=True, desc=f"shard {spec.index + 1}/{ctx.n_shards}"
    )
    try:
        for batch in extract_docs(
            pair.base,
            pair.finetuned,
            models.layer,
            docs,
            extract.batch_tokens,
            pair.device,
            dtype,
            extract.dtype,
            extract.skip_first,
            extract.save_raw,
            pad_id,
        ):
            writer.put(batch)
            bar.update(batch.n_tokens)
        rec = writer.close(spec.doc_start, spec.doc_end, spec.key)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if rec.rows != spec.n_tokens:
        raise RuntimeError(f"shard {spec.index}: wrote {rec.rows} rows, expected {spec.n_tokens}")
    return {**rec._asdict(), "seconds": time.perf_counter() - t0}


@task(name="commit-activations", cache_policy=INPUTS + TASK_SOURCE, **IO_RETRY)
def commit_activations(
    store_root: str,
    run: str,
    shard_keys: list[str],
    shard_digests: list[str],
    plan_key: str,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Write docs and tokens tables, then the manifest (last). Returns the manifest fingerprint and counts.

    Keyed by the shards' sha256: recomputed shards identical to the old ones leave the manifest cached."""
    paths, store = RunPaths(store_root, run), Store(store_root)
    records = []
    for i, key in enumerate(shard_keys):
        rec = act.read_sidecar(store, paths, i)
        if (
            rec is None
            or rec.sha256 != shard_digests[i]
            or not act.shard_valid(store, paths, rec, key, "size")
        ):
            raise RuntimeError(f"shard {i} is missing or does not match its record; rerun extraction")
        records.append(rec)
    docs = _docs(meta["data_path"], meta["tokenizer"], meta["max_tokens"], meta["max_docs"])
    act.write_docs_table(store, paths, docs)
    n_tok = act.write_tokens_table(store, paths, records)
    fp = act.commit_manifest(store, paths, records, {"plan_key": plan_key, "n_docs": len(docs), **meta})
    return {"fingerprint": fp, "rows": n_tok, "shards": len(records), "docs": len(docs)}


def manifest_ok(store: Store, paths: RunPaths, plan_key: str) -> bool:
    m = act.read_manifest(store, paths)
    if m is None or m.get("plan_key") != plan_key:
        return False
    return all(store.exists(paths.shard(s["index"])) for s in m["shards"]) and store.exists(
        paths.url("activations", "tokens.parquet")
    )
