"""Content fingerprints of models: what a stage key records about the pair, whatever path it was loaded from.

`model_fingerprint(path_or_id)` is a sha256 over (name, sha256) of the config, tokenizer and weight files of a
local folder or cached hub model. A folder diffsae made from another source (a dequantized `.gguf`, a base merged
with a LoRA adapter; see `diffsae.sources`) records the fingerprint of that source in `diffsae_source.json`, and that
is its fingerprint: the GGUF's bytes, or the base's fingerprint with the adapter's files.

Per-file digests of big files are memoised in `~/.cache/diffsae/file_hashes.json` (or `$DIFFSAE_CACHE_DIR`) keyed by
(abspath, size, mtime_ns).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from diffsae.config import local_cache_dir

SOURCE_FILE = "diffsae_source.json"  # in a folder diffsae built from a .gguf or a LoRA adapter
_FINGERPRINT_NAMES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth")
_MEMO_MIN_BYTES = 1 << 20


class PairError(ValueError):
    """The model pair cannot be diffed (or a model cannot be read or fingerprinted); the message is one line.
    Defined here, the lowest module that raises it; `diffsae.models` exports it."""


def _memo_path() -> Path:
    return local_cache_dir() / "file_hashes.json"


def read_memo() -> dict[str, str]:
    try:
        data = json.loads(_memo_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_memo(memo: dict[str, str]) -> None:
    path = _memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs recomputation


def file_sha256(path: Path, memo: dict[str, str] | None = None) -> str:
    """sha256 of a file's bytes; big files are looked up in / added to `memo` by (abspath, size, mtime_ns)."""
    real = Path(os.path.realpath(path))
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    if memo is not None and key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None and st.st_size >= _MEMO_MIN_BYTES:
        memo[key] = digest
    return digest


def memo_sha256(path: Path) -> str:
    """`file_sha256` through the machine's memo (a 100 MB checkpoint is hashed once per version of the file)."""
    memo = read_memo()
    before = dict(memo)
    digest = file_sha256(path, memo)
    if memo != before:
        write_memo(memo)
    return digest


def files_digest(folder: Path, files: list[Path]) -> str:
    """sha256 over (name, sha256) of `files` (relative to `folder`), memoised per file."""
    memo = read_memo()
    before = dict(memo)
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(folder)}\0{file_sha256(p, memo)}\n".encode())
    if memo != before:
        write_memo(memo)
    return h.hexdigest()


def _fingerprint_files(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    return [p for p in files if p.name in _FINGERPRINT_NAMES or p.name.endswith(_WEIGHT_SUFFIXES)]


def hub_folder(repo_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a hub id)
        return None


def recorded_fingerprint(folder: Path) -> str | None:
    """The fingerprint a folder built by `diffsae.sources` records for its source; None for any other folder."""
    try:
        return str(json.loads((folder / SOURCE_FILE).read_text())["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def model_fingerprint(path_or_id: str, revision: str | None = None) -> str:
    """sha256 over (name, sha256) of config, tokenizer and weight files of a local folder or cached hub model (a
    folder built from a .gguf or an adapter: its source's fingerprint)."""
    folder = Path(path_or_id).expanduser()
    if not folder.is_dir():
        hub = hub_folder(path_or_id, revision)
        if hub is None:
            raise PairError(f"cannot fingerprint {path_or_id}: not a local folder nor a cached hub model")
        folder = hub
    if (recorded := recorded_fingerprint(folder)) is not None:
        return recorded
    files = _fingerprint_files(folder)
    if not any(p.name == "config.json" for p in files):
        raise PairError(f"cannot fingerprint {path_or_id}: no config.json in {folder}")
    return files_digest(folder, files)
