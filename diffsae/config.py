"""Typed configuration of the whole diffsae pipeline.

One pydantic model, loadable from YAML, that rejects unknown keys and checks values at construction. Every field
carries a one-line description: Prefect renders them as the deployment's UI form.

    cfg = PipelineConfig.from_yaml("run.yaml", overrides={"store": "s3://bucket/x"})

Without `models.base`/`models.finetuned` and `data`, the built-in planted demo pair (`demo`) and its held-out prompts
are used; `models.layer` is the analysed layer either way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from diffsae.config_analysis import (
    SCORE_ALIASES,
    SCORES,
    AttributionConfig,
    DashboardsConfig,
    RankBy,
    RankConfig,
    Role,
    Score,
    ValidationConfig,
    resolve_score,
)  # fmt: skip
from diffsae.config_base import ConfigError
from diffsae.config_base import Section as _Section

__all__ = [  # the analysis sections are defined in diffsae/config_analysis.py
    "SCORE_ALIASES", "SCORES", "AttributionConfig", "ConfigError", "DashboardsConfig", "RankBy", "RankConfig", "Role",
    "Score", "ValidationConfig", "resolve_score",
]  # fmt: skip

DType = Literal["float32", "bfloat16", "float16"]
Method = Literal["diff_sae", "crosscoder", "adl"]  # diffsae/methods.py
Mix = Literal["audit", "easy", "null", "kinds", "kinds_null"]  # the built-in pair's recipes (organisms/demo_pair.py)


def local_cache_dir() -> Path:
    """This machine's cache folder (model mirrors, file hashes, the MLflow db of S3 stores): $DIFFSAE_CACHE_DIR
    or ~/.cache/diffsae. Nothing on the store ever refers to it."""
    return Path(os.environ.get("DIFFSAE_CACHE_DIR") or Path.home() / ".cache" / "diffsae")


class ModelsConfig(_Section):
    base: str | None = Field(
        None, description="Base model: HF folder, hub id or .gguf file (omit: the built-in demo pair)"
    )
    finetuned: str | None = Field(
        None,
        description="Finetuned model: HF folder, hub id, .gguf file or LoRA adapter folder over the base; same "
        "tokenizer and width (omit: the demo pair)",
    )
    layer: int = Field(2, ge=0, description="Residual stream at the output of decoder block `layer` (0-indexed)")
    dtype: DType = Field("float32", description="Dtype the models are loaded in")
    device: str = Field("auto", description="torch device: auto (CUDA when present), cpu, cuda, cuda:1, ...")
    revision: str | None = Field(None, description="Hub revision for both models (ignored for local folders)")
    check_adapter_base: bool = Field(
        True, description="Refuse a LoRA adapter whose recorded base model is not models.base (shapes always checked)"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto" and not (v == "cpu" or v == "mps" or v.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu, mps or cuda[:N], got {v!r}")
        return v

    @model_validator(mode="after")
    def _both_or_neither(self) -> "ModelsConfig":
        if (self.base is None) != (self.finetuned is None):
            raise ValueError("give both base and finetuned, or neither for the built-in demo pair")
        return self


class DataConfig(_Section):
    path: str = Field(description="Prompts: JSONL or Parquet with `messages` or `text` (+ optional id, behaviour)")
    max_tokens_per_doc: int = Field(256, ge=2, description="Documents are truncated to this many tokens")
    max_docs: int | None = Field(None, ge=1, description="Use only the first N documents (None: all)")


class DemoConfig(_Section):
    preset: Literal["demo", "small"] = Field("demo", description="Size of the built-in planted pair")
    seed: int = Field(0, description="Seed of the built-in pair (data, weights, planted triggers)")
    mix: Mix = Field(
        "audit",
        description="audit: planted behaviours are rare; easy: they cover about a third of the docs; null: the audit "
        "recipe without planted behaviours (a null organism: what a ranking finds there is a false alarm); kinds / "
        "kinds_null: the same with suffix insertion, topic-conditioned and style changes",
    )


class ExtractConfig(_Section):
    dtype: Literal["float16", "float32"] = Field("float16", description="Storage dtype of the activation diffs")
    batch_tokens: int = Field(4096, ge=16, description="Token budget of one forward batch (padded tokens count)")
    shard_tokens: int = Field(65536, ge=16, description="Tokens per Parquet shard (bounded shard size)")
    skip_first: int = Field(1, ge=0, description="First positions of every doc excluded from SAE data (BOS sink)")
    save_raw: bool = Field(False, description="Also store raw base and finetuned activations")
    save_states: bool = Field(
        True,
        description="Also store float32 h_base, h_ft and the finetuned final hidden state (12·d bytes per token), so "
        "attribution runs only the patched passes; false: attribution reruns both models unpatched",
    )
    runner: Literal["local", "dask", "ray"] = Field(
        "local", description="Engine of the extraction and attribution shards: local (in the flow), dask or ray"
    )
    cluster_address: str | None = Field(
        None,
        description="Existing cluster (dask: tcp://scheduler:8786, ray: ray://head:10001 or auto); None: start one",
    )
    n_workers: int = Field(
        2, ge=1, description="Worker processes (1 thread each) of the local cluster started without cluster_address"
    )
    verify: Literal["checksum", "size"] = Field(
        "checksum", description="Check of existing shards on rerun: sha256 (re-reads them) or size only"
    )

    @model_validator(mode="after")
    def _runner_available(self) -> "ExtractConfig":
        if self.runner == "local" and self.cluster_address is not None:
            raise ValueError("cluster_address is set but runner is local: set runner to dask or ray")
        if self.runner != "local":
            from importlib.util import find_spec

            package = f"prefect_{self.runner}"
            if find_spec(package) is None:
                raise ValueError(
                    f"runner {self.runner} needs {package.replace('_', '-')}: pip install {package.replace('_', '-')}"
                )
        return self


class SAEConfig(_Section):
    n_latents: int = Field(2048, ge=1, description="Dictionary size (number of latents)")
    k: int = Field(32, ge=1, description="Mean active latents per token (BatchTopK k)")
    batch_size: int = Field(2048, ge=1, description="Tokens per training batch")
    lr: float | None = Field(
        None, gt=0, description="Adam learning rate (None: 2e-4 / sqrt(n_latents / 16384), ~1e-4 at 73,728 latents)"
    )
    n_tokens: int | None = Field(
        None, ge=1, description="Training tokens (None: `epochs` passes over the training split)"
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training split when n_tokens is None")
    min_tokens: int = Field(
        2_000_000, ge=0, description="When n_tokens is None, train on at least this many tokens (repeating data)"
    )
    auxk_alpha: float = Field(1 / 32, ge=0, description="Weight of the AuxK loss on dead latents (Gao et al. 2024)")
    dead_tokens: int = Field(10_000_000, ge=1, description="A latent is dead after this many tokens without firing")
    calibration_fraction: float = Field(
        0.1, ge=0, lt=1, description="Fraction of documents held out of SAE training to calibrate the inference "
        "threshold on: mean L0 = k there (0: calibrate on the training documents)"
    )  # fmt: skip
    calibration_tokens: int = Field(
        65536, ge=0, description="Calibrate on at most this many tokens (0: keep the training EMA of the batch "
        "top-k's smallest kept value)"
    )  # fmt: skip
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Fraction of documents held out for validation")
    shuffle_buffer: int = Field(65536, ge=1, description="Rows in the shuffle buffer that mixes shards")
    seed: int = Field(0, description="Seed of initialisation and shuffling")
    device: str = Field("auto", description="Training device: auto, cpu, cuda[:N]")

    @property
    def learning_rate(self) -> float:
        """`lr`, or the width scaling rule of dictionary_learning / Bussmann et al. 2024 when it is None."""
        return self.lr if self.lr is not None else 2e-4 / (self.n_latents / 16384) ** 0.5

    def train_tokens(self, n_train: int) -> int:
        """Tokens to train on, given the training split's size."""
        if self.n_tokens is not None:
            return self.n_tokens
        return max(int(self.epochs * n_train), self.min_tokens)

    @model_validator(mode="after")
    def _k_le_latents(self) -> "SAEConfig":
        if self.k > self.n_latents:
            raise ValueError(f"k ({self.k}) must not exceed n_latents ({self.n_latents})")
        return self


class ADLConfig(_Section):
    first: int = Field(5, ge=1, description="Positions averaged per document (from extract.skip_first on)")


class PipelineConfig(_Section):
    run: str = Field("demo", description="Run name; all outputs of a run live under <store>/runs/<run>/")
    store: str = Field("./diffsae-data", description="Artifact store: local folder or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (default: AWS_ENDPOINT_URL)")
    lock_wait_s: float = Field(0, ge=0, description="Wait this long for another flow holding the same run (0: fail)")
    models: ModelsConfig = Field(
        default_factory=ModelsConfig, description="Model pair and layer (no base/finetuned: the built-in demo pair)"
    )
    data: DataConfig | None = Field(None, description="Prompts (omit: the built-in pair's held-out prompts)")
    demo: DemoConfig = Field(default_factory=DemoConfig, description="Built-in pair settings (used without models)")
    extract: ExtractConfig = Field(default_factory=ExtractConfig, description="Activation extraction")
    methods: list[Method] = Field(
        ["diff_sae"], min_length=1, description="Methods run on the same activations (first: the run's main results)"
    )
    sae: SAEConfig = Field(default_factory=SAEConfig, description="Diff-SAE training (the crosscoder's too)")
    adl: ADLConfig = Field(default_factory=ADLConfig, description="Activation-difference lens (method adl)")
    attribution: AttributionConfig = Field(default_factory=AttributionConfig, description="KL attribution")
    rank: RankConfig = Field(default_factory=RankConfig, description="Narrow ranking and broad changes")
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig, description="Causal validation of the top latents (ablation, steering)"
    )
    dashboards: DashboardsConfig = Field(default_factory=DashboardsConfig, description="Static dashboards")

    @field_validator("run")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v):
            raise ValueError(f"run must be 1-64 chars of letters, digits, '.', '_', '-', got {v!r}")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"methods must not repeat, got {v}")
        return v

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if "://" in v and not v.startswith("s3://") and not v.startswith("file://"):
            raise ValueError(f"store must be a local folder or s3://bucket/prefix, got {v!r}")
        if v.startswith("s3://") and len(v) <= len("s3://"):
            raise ValueError("store s3:// URL needs a bucket")
        return v

    @model_validator(mode="after")
    def _data_needs_models(self) -> "PipelineConfig":
        if self.data is not None and self.models.base is None:
            raise ValueError("data is set but models.base is not: give both, or neither for the built-in demo pair")
        if self.models.base is not None and self.data is None:
            raise ValueError("models.base is set but data is not: give both, or neither for the built-in demo pair")
        return self

    @property
    def uses_demo_pair(self) -> bool:
        return self.models.base is None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "PipelineConfig":
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(f"{source}: {one_line(e)}") from None

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> "PipelineConfig":
        raw: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            try:
                loaded = yaml.safe_load(p.read_text())
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: invalid YAML: {' '.join(str(e).split())}") from None
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
            raw = loaded
        for key, value in (overrides or {}).items():
            if value is not None:
                raw[key] = value
        return cls.from_dict(raw, source=str(path) if path else "config")


def one_line(e: ValidationError) -> str:
    """The first validation error as `a.b.c: message` (plus a count of the others)."""
    errs = e.errors()
    first = errs[0]
    loc = ".".join(str(x) for x in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc}: {msg}{more}"
