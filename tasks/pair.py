"""Stage 0: the model pair. The built-in planted demo pair is built once per (preset, seed, mix, builder source)
into `<store>/cache/demo_pair/<key>/` and reused by every run on that store; user pairs need no stage.

Models are loaded by transformers from local folders, so a pair on an S3 store is mirrored into the local cache
(`~/.cache/diffsae/mirror/<key>/`) before use.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from diffsae.config import DataConfig, DemoConfig, ModelsConfig, PipelineConfig
from storage.paths import RunPaths
from storage.store import Store
from tasks.common import IO_RETRY, STAGE_CACHE

DONE = "DONE.json"


def demo_key(demo: DemoConfig) -> str:
    import diffsae.demo_corpus
    import diffsae.demo_pair
    import diffsae.demo_train

    src = "".join(inspect.getsource(m) for m in (diffsae.demo_pair, diffsae.demo_corpus, diffsae.demo_train))
    raw = f"{demo.preset}|{demo.seed}|{demo.mix}|{hashlib.sha256(src.encode()).hexdigest()}"
    return f"{demo.preset}-s{demo.seed}-{demo.mix}-" + hashlib.sha256(raw.encode()).hexdigest()[:12]


def demo_pair_url(paths: RunPaths, demo: DemoConfig) -> str:
    return paths.cache_dir("demo_pair", demo_key(demo))


def demo_pair_ok(store: Store, paths: RunPaths, demo: DemoConfig) -> bool:
    return store.exists(f"{demo_pair_url(paths, demo)}/{DONE}")


def _upload_tree(store: Store, local: Path, url: str) -> None:
    for f in sorted(local.rglob("*")):
        if f.is_file():
            store.put_file(str(f), f"{url}/{f.relative_to(local).as_posix()}")


@task(name="build-demo-pair", cache_policy=STAGE_CACHE, **IO_RETRY)
def build_demo_pair_task(store_root: str, demo: dict[str, Any], key: str) -> dict[str, Any]:
    """Build the planted pair (≤ 5 min for the demo preset on 2 cores) and publish it on the store."""
    from diffsae.demo_pair import build_demo_pair

    cfg = DemoConfig.model_validate(demo)
    store = Store(store_root)
    url = store.root + f"/cache/demo_pair/{key}"
    if store.exists(f"{url}/{DONE}"):  # complete on the store (its cache record was lost): reuse, never rebuild
        return {"url": url, "key": key}
    if store.is_s3:
        with tempfile.TemporaryDirectory() as tmp:
            build_demo_pair(Path(tmp) / "pair", preset=cfg.preset, seed=cfg.seed, mix=cfg.mix)
            _upload_tree(store, Path(tmp) / "pair", url)
    else:
        if Path(url).exists():  # an older build without DONE marker: rebuild cleanly
            store.delete_tree(url)
        build_demo_pair(Path(url), preset=cfg.preset, seed=cfg.seed, mix=cfg.mix)
    profile = store.read_json(f"{url}/kl_profile.json") if store.exists(f"{url}/kl_profile.json") else {}
    store.write_json(f"{url}/{DONE}", {"key": key, "kl_profile": profile})  # last: marks the pair complete
    return {"url": url, "key": key}


def local_copy(store: Store, url: str, key: str) -> str:
    """A local folder with the content of `url` (the folder itself for local stores)."""
    if not store.is_s3:
        return url
    root = Path(os.environ.get("DIFFSAE_CACHE_DIR") or Path.home() / ".cache" / "diffsae") / "mirror" / key
    if (root / DONE).exists():
        return str(root)
    tmp = Path(tempfile.mkdtemp(prefix=".mirror-", dir=root.parent if root.parent.exists() else None))
    prefix = store._p(url).rstrip("/")
    for f in store.fs.find(prefix):
        dst = tmp / f[len(prefix) + 1 :]
        dst.parent.mkdir(parents=True, exist_ok=True)
        store.fs.get_file(f, str(dst))
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        store_tmp = Path(tempfile.mkdtemp(dir=root.parent))
        root.rename(store_tmp / "old")
    tmp.rename(root)
    return str(root)


def resolved_models(cfg: PipelineConfig, pair_dir: str | None) -> tuple[ModelsConfig, DataConfig]:
    """The models and data a run uses: the config's, or the demo pair's with its held-out prompts."""
    if cfg.models is not None and cfg.data is not None:
        return cfg.models, cfg.data
    assert pair_dir is not None
    models = ModelsConfig(
        base=f"{pair_dir}/base",
        finetuned=f"{pair_dir}/finetuned",
        layer=cfg.demo.layer,
        dtype="float32",
        device="auto",
    )
    return models, DataConfig(path=f"{pair_dir}/prompts.jsonl", max_tokens_per_doc=256)
