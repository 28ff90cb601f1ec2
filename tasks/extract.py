"""Stage 1 tasks: one cached task per activation shard, then a commit task that writes the manifest last.

A shard's key is its content (model fingerprints, layer, model dtype, the shard's token ids and roles, the
extract settings that change the output) + the source of `write_shard`; its sidecar (size + sha256 + key) is its
completion marker. A killed run restarted recomputes only the shards whose file is missing or fails its sidecar
check; the manifest, the stage's marker, is written only when every shard is in place, so a reader never sees a
partial stage. The prompts file is uploaded to the store first (`inputs/<sha256>-<name>`), so every task input
and the manifest name it by its store URL, never by a path of this machine.
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

import torch
from prefect import task
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from diffsae.config import DataConfig, ExtractConfig, ModelsConfig
from diffsae.data import data_fingerprint
from diffsae.extract import extract_docs
from storage import activations as act
from storage import schemas
from storage.context import RunContext
from storage.paths import is_s3
from tasks.common import IO_RETRY, STAGE_CACHE, code_version, stable_hash, stage_key
from tasks.models import MODEL_CACHE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


class ShardInputs(BaseModel):
    """How to compute a shard (not part of its key: `ShardSpec.key` already says what the output depends on)."""

    model_config = ConfigDict(frozen=True)
    models: ModelsConfig
    data: DataConfig  # `path` is the prompts' URL on the store
    extract: ExtractConfig
    n_shards: int


class Activations(NamedTuple):
    """The committed activations stage (its manifest)."""

    key: str
    fingerprint: str  # hash of the shards' (index, sha256, rows, key): what downstream stages depend on
    rows: int
    n_docs: int
    n_shards: int


def upload_data(ctx: RunContext, path: str) -> str:
    """The prompts file's URL on the store, `<store>/inputs/<sha256>-<name>` (uploaded once per content)."""
    if is_s3(path) or path.startswith(ctx.store_url + "/"):
        return path
    url = ctx.paths.cache_dir("inputs", f"{data_fingerprint(path)[:24]}-{os.path.basename(path)}")
    if not ctx.store.exists(url):
        ctx.store.put_file(path, url)
    return url


def plan_extraction(
    ctx: RunContext, models: ModelsConfig, data: DataConfig, extract: ExtractConfig, fingerprints: tuple[str, str]
) -> ExtractPlan:
    """Tokenize the dataset (tokenizer only, no model) and cut it into shards of ~extract.shard_tokens tokens."""
    assert models.finetuned is not None
    docs = MODEL_CACHE.docs(ctx, data.path, models, data.max_tokens_per_doc, data.max_docs)
    settings = {
        "layer": models.layer,
        "model_dtype": models.dtype,
        "dtype": extract.dtype,
        "skip_first": extract.skip_first,
        "save_raw": extract.save_raw,
        "save_states": extract.save_states,
        "models": fingerprints,
        "code": code_version(write_shard),
    }
    shards: list[ShardSpec] = []
    start, n = 0, 0
    for i, d in enumerate(docs):
        n += len(d.token_ids)
        if n >= extract.shard_tokens or i == len(docs) - 1:
            content = [(x.doc_id, x.token_ids, x.roles) for x in docs[start : i + 1]]
            shards.append(ShardSpec(len(shards), start, i + 1, n, "shard-" + stable_hash(settings, content)))
            start, n = i + 1, 0
    total = sum(s.n_tokens for s in shards)
    return ExtractPlan(shards, len(docs), total, stable_hash(settings, [s.key for s in shards]))


def shard_done(ctx: RunContext, spec: ShardSpec, verify: str = "checksum") -> act.ShardRecord | None:
    """The shard's record when its file is on the store and matches it (size, and sha256 for `checksum`)."""
    rec = act.read_sidecar(ctx.store, ctx.paths, spec.index)
    return rec if act.shard_valid(ctx.store, ctx.paths, rec, spec.key, verify) else None


def write_shard(ctx: RunContext, spec: ShardSpec, inputs: ShardInputs) -> act.ShardRecord:
    """Run both models over the shard's documents and write the shard (+ sidecar) atomically."""
    done = shard_done(ctx, spec, inputs.extract.verify)
    if done is not None:
        return done
    models, extract = inputs.models, inputs.extract
    assert models.finetuned is not None
    pair = MODEL_CACHE.pair(ctx, models)
    data = inputs.data
    docs = MODEL_CACHE.docs(ctx, data.path, models, data.max_tokens_per_doc, data.max_docs)
    d_model = int(pair.base.config.get_text_config().hidden_size)
    schema = schemas.activation_shard(d_model, extract.dtype, extract.save_raw, extract.save_states)
    strings = MODEL_CACHE.token_strings(ctx, models)
    writer = act.ShardWriter(ctx.store, ctx.paths, spec.index, schema, strings)
    pad_id = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    t0 = time.perf_counter()
    bar = tqdm(total=spec.n_tokens, unit="tok", unit_scale=True, desc=f"shard {spec.index + 1}/{inputs.n_shards}")
    try:
        for batch in extract_docs(
            pair.base,
            pair.finetuned,
            models.layer,
            docs[spec.doc_start : spec.doc_end],
            extract.batch_tokens,
            pair.device,
            DTYPES[models.dtype],
            extract.dtype,
            extract.skip_first,
            extract.save_raw,
            pad_id,
            extract.save_states,
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
    print(f"shard {spec.index}: {rec.rows} tokens in {time.perf_counter() - t0:.1f} s")
    return rec


@task(name="extract-shard", cache_policy=STAGE_CACHE, **IO_RETRY, task_run_name="extract-shard-{spec.index}")
def extract_shard(ctx: RunContext, spec: ShardSpec, inputs: ShardInputs, key: str) -> act.ShardRecord:
    return write_shard(ctx, spec, inputs)


def activations_key(plan: ExtractPlan, digests: list[str], meta: dict[str, Any]) -> str:
    """Keyed by the shards' sha256: recomputed shards identical to the old ones leave the manifest in place."""
    return stage_key("activations", commit, plan.data_key, digests, meta)


def activations_done(ctx: RunContext, key: str) -> Activations | None:
    m = act.read_manifest(ctx.store, ctx.paths)
    if m is None or m.get("key") != key:
        return None
    if not all(ctx.store.exists(ctx.paths.shard(s["index"])) for s in m["shards"]):
        return None
    if not ctx.store.exists(ctx.paths.table("activation_tokens")):
        return None
    return Activations(m["key"], m["fingerprint"], m["rows"], m["n_docs"], len(m["shards"]))


def read_manifest(ctx: RunContext, activations: Activations) -> dict[str, Any]:
    """The manifest the downstream stage was keyed on (else the activations changed under it: one-line error)."""
    manifest = act.read_manifest(ctx.store, ctx.paths)
    if manifest is None or manifest["fingerprint"] != activations.fingerprint:
        raise RuntimeError("activation manifest missing or changed: rerun extraction")
    return manifest


def commit(
    ctx: RunContext, inputs: ShardInputs, shard_keys: list[str], digests: list[str], meta: dict[str, Any], key: str
) -> Activations:
    """Write the docs and tokens tables, then the manifest (last)."""
    done = activations_done(ctx, key)
    if done is not None:
        return done
    store, paths = ctx.store, ctx.paths
    records = []
    for i, shard_key in enumerate(shard_keys):
        rec = act.read_sidecar(store, paths, i)
        if rec is None or rec.sha256 != digests[i] or not act.shard_valid(store, paths, rec, shard_key, "size"):
            raise RuntimeError(f"shard {i} is missing or does not match its record; rerun extraction")
        records.append(rec)
    assert inputs.models.finetuned is not None
    data = inputs.data
    docs = MODEL_CACHE.docs(ctx, data.path, inputs.models, data.max_tokens_per_doc, data.max_docs)
    act.write_docs_table(store, paths, docs)
    rows = act.write_tokens_table(store, paths, records)
    fp = act.commit_manifest(store, paths, records, {"key": key, "n_docs": len(docs), "n_shards": len(records), **meta})
    return Activations(key, fp, rows, len(docs), len(records))


@task(name="commit-activations", cache_policy=STAGE_CACHE, **IO_RETRY)
def commit_activations(
    ctx: RunContext, inputs: ShardInputs, shard_keys: list[str], digests: list[str], meta: dict[str, Any], key: str
) -> Activations:
    return commit(ctx, inputs, shard_keys, digests, meta, key)
