"""Where Prefect persists task results (and so its cache records): `<store>/runs/<run>/.prefect/` for a run's
stages, `<store>/cache/.prefect/` for store-wide ones (the built-in demo pair, shared by every run on the store).

Local stores use a plain path; S3 stores need a saved RemoteFileSystem block (Prefect only accepts saved blocks
for remote result storage). The block holds no credentials (s3fs reads them from the standard AWS variables) and the
run context's endpoint, so any machine sharing the store finds the same cache records.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from storage.paths import is_s3


def result_storage(url: str, endpoint: str | None) -> Any:
    """Prefect result storage at `url` (a local folder, or an s3:// URL reached through `endpoint`)."""
    if not is_s3(url):
        Path(url).mkdir(parents=True, exist_ok=True)
        return Path(url)
    from prefect.filesystems import RemoteFileSystem

    settings: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
    if endpoint:
        settings["client_kwargs"] = {"endpoint_url": endpoint}
    block = RemoteFileSystem(basepath=url, settings=settings)
    name = "diffsae-results-" + hashlib.sha256(f"{url}|{endpoint}".encode()).hexdigest()[:16]
    block.save(name, overwrite=True)
    return block
