"""Where Prefect persists task results (and so its cache records): `<store>/runs/<run>/.prefect/`.

Local stores use a plain path; S3 stores need a saved RemoteFileSystem block (Prefect only accepts saved blocks
for remote result storage). The block holds no credentials: s3fs reads them, and the endpoint, from the standard
AWS variables, so any machine sharing the store finds the same cache records.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from storage.paths import RunPaths, is_s3
from storage.store import s3_endpoint


def result_storage(paths: RunPaths) -> Any:
    url = paths.prefect_results
    if not is_s3(url):
        Path(url).mkdir(parents=True, exist_ok=True)
        return Path(url)
    from prefect.filesystems import RemoteFileSystem

    settings: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
    endpoint = s3_endpoint()
    if endpoint:
        settings["client_kwargs"] = {"endpoint_url": endpoint}
    block = RemoteFileSystem(basepath=url, settings=settings)
    name = "diffsae-results-" + hashlib.sha256(f"{url}|{endpoint}".encode()).hexdigest()[:16]
    block.save(name, overwrite=True)
    return block
