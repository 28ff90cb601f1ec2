"""What every export needs to know about a run, read once from its stage markers on the store.

Why from the store and not from the config: an export describes what the run *did* (the models, layer and context
size its activations were extracted with, the SAE it trained), and only the stage outputs say that for sure; the
config passed to `diffsae export` only names the store and the run.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from storage.context import RunContext


class ExportError(RuntimeError):
    """A run that cannot be exported (missing stage output, bad destination): reported as one line."""


class RunInfo(NamedTuple):
    run: str
    store: str
    base: str  # base model as the run named it (hub id, folder, or a URL on the store)
    finetuned: str
    layer: int  # residual stream at the output of decoder block `layer`
    hook_name: str  # the TransformerLens name of that point, `blocks.{layer}.hook_resid_post`
    context_size: int  # data.max_tokens_per_doc: documents were truncated to this many tokens
    prompts: str  # the prompts file's URL on the store
    n_docs: int
    n_tokens: int
    activations_fingerprint: str
    sae_cfg: dict[str, Any]  # sae/cfg.json (architecture, d_in, n_latents, k, threshold, scale, sae_config, ...)
    sae_metrics: dict[str, Any]  # sae/metrics.json (fvu, l0, dead_fraction, kl_gap_recovered, weights_sha256, ...)
    rank_by: str | None  # analysis/ranking.json's score, None before the ranking stage


def hook_name(layer: int) -> str:
    """diffsae's `layer: L` (output of block L) is TransformerLens's `blocks.L.hook_resid_post`."""
    return f"blocks.{int(layer)}.hook_resid_post"


def _read(ctx: RunContext, *parts: str) -> Any:
    try:
        return ctx.store.read_json(ctx.paths.url(*parts))
    except FileNotFoundError:
        return None


def resolve_location(ctx: RunContext, location: str) -> str:
    """A location as the manifest records it (`<store>/...` for anything on the run's store, see
    RunContext.portable) as a URL or path of this store."""
    prefix = "<store>/"
    return ctx.store_url + "/" + location[len(prefix) :] if location.startswith(prefix) else location


def read_run_info(ctx: RunContext) -> RunInfo:
    """The run's activations manifest and SAE (both must be done), and its ranking score if ranked."""
    manifest = _read(ctx, "activations", "manifest.json")
    if manifest is None:
        raise ExportError(f"run '{ctx.run}' on {ctx.store_url} has no activations (activations/manifest.json)")
    sae_cfg, metrics = _read(ctx, "sae", "cfg.json"), _read(ctx, "sae", "metrics.json")
    if sae_cfg is None or metrics is None:
        raise ExportError(f"run '{ctx.run}' has no trained SAE (sae/metrics.json): run the pipeline first")
    ranking = _read(ctx, "analysis", "ranking.json") or {}
    layer = int(manifest["layer"])
    return RunInfo(
        run=ctx.run,
        store=ctx.store_url,
        base=resolve_location(ctx, str(manifest["base"])),
        finetuned=resolve_location(ctx, str(manifest["finetuned"])),
        layer=layer,
        hook_name=hook_name(layer),
        context_size=int(manifest["data"]["max_tokens_per_doc"]),
        prompts=resolve_location(ctx, str(manifest["data"]["path"])),
        n_docs=int(manifest["n_docs"]),
        n_tokens=int(manifest.get("tokens", manifest["rows"])),
        activations_fingerprint=str(manifest["fingerprint"]),
        sae_cfg=sae_cfg,
        sae_metrics=metrics,
        rank_by=ranking.get("rank_by"),
    )
