"""Object store access: a local folder or `s3://bucket/prefix`, the same API for both.

Writes are atomic: a reader never sees a half-written object. Locally we write a hidden temp file in the target
folder and `os.replace` it; on S3 an object becomes visible only when its PUT (or multipart upload) completes, and
we upload from a finished local temp file, so an interrupted write leaves nothing behind.

S3 credentials come from the standard variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, or a
profile); the endpoint is explicit (the config's `s3_endpoint_url`) or, when not given, AWS_ENDPOINT_URL_S3 /
AWS_ENDPOINT_URL: `s3_endpoint` is the one place that reads them. `Store.check()` turns a missing bucket, refused
credentials or an unreachable endpoint into one clear line, before any compute.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from functools import cached_property
from typing import Any, Iterator

from storage.paths import is_s3, normalize_root


class StoreError(RuntimeError):
    """A store problem, reported as one line."""


def s3_endpoint(explicit: str | None = None) -> str | None:
    """The S3 endpoint to use: `explicit`, else the environment's (None: the default AWS endpoint)."""
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_storage_options(endpoint_url: str | None = None, fast_fail: bool = False) -> dict[str, Any]:
    """Options for s3fs.S3FileSystem (also usable as fsspec `storage_options`)."""
    config: dict[str, Any] = {"connect_timeout": 3 if fast_fail else 10, "read_timeout": 60}
    config["retries"] = {"max_attempts": 1 if fast_fail else 4, "mode": "standard"}
    opts: dict[str, Any] = {"use_listings_cache": False, "config_kwargs": config}
    endpoint = s3_endpoint(endpoint_url)
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    if os.environ.get("AWS_REGION"):
        opts.setdefault("client_kwargs", {})["region_name"] = os.environ["AWS_REGION"]
    return opts


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class Store:
    """A store rooted at `root`. Every method takes full URLs (built by storage.paths)."""

    def __init__(self, root: str, endpoint_url: str | None = None) -> None:
        self.root = normalize_root(root)
        self.endpoint_url = s3_endpoint(endpoint_url) if is_s3(self.root) else None

    @property
    def is_s3(self) -> bool:
        return is_s3(self.root)

    @cached_property
    def fs(self) -> Any:
        if self.is_s3:
            import s3fs

            return s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options(self.endpoint_url))
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem()

    @staticmethod
    def _p(url: str) -> str:
        return url[len("s3://") :] if url.startswith("s3://") else url

    def _url(self, path: str) -> str:
        return "s3://" + path if self.is_s3 and not path.startswith("s3://") else path

    # -- checks
    def check(self) -> None:
        """Fail with one line when the store cannot be used (missing bucket, credentials, endpoint)."""
        if not self.is_s3:
            try:
                os.makedirs(self.root, exist_ok=True)
                probe = os.path.join(self.root, f".probe-{uuid.uuid4().hex}")
                with open(probe, "wb"):
                    pass
                os.remove(probe)
            except OSError as e:
                raise StoreError(f"store {self.root} is not writable: {_one_line(e)}") from None
            return
        import s3fs

        bucket = self._p(self.root).split("/")[0]
        where = self.endpoint_url or "the default AWS endpoint"
        if not os.environ.get("AWS_ACCESS_KEY_ID") and not os.environ.get("AWS_PROFILE"):
            raise StoreError(
                f"no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for {where}"
            )
        fs = s3fs.S3FileSystem(
            skip_instance_cache=True, **s3_storage_options(self.endpoint_url, fast_fail=True)
        )
        try:
            fs.ls(bucket, refresh=True)
        except FileNotFoundError:
            raise StoreError(f"S3 bucket '{bucket}' does not exist at {where}") from None
        except PermissionError as e:
            raise StoreError(f"S3 credentials refused by {where}: {_one_line(e)}") from None
        except Exception as e:  # botocore EndpointConnectionError, aiohttp errors, timeouts
            raise StoreError(f"cannot reach S3 endpoint {where}: {_one_line(e)}") from None

    # -- reads
    def exists(self, url: str) -> bool:
        return bool(self.fs.exists(self._p(url)))

    def read_bytes(self, url: str) -> bytes:
        return bytes(self.fs.cat_file(self._p(url)))

    def read_json(self, url: str) -> Any:
        return json.loads(self.read_bytes(url))

    def size(self, url: str) -> int:
        return int(self.fs.size(self._p(url)))

    def open_read(self, url: str) -> Any:
        return self.fs.open(self._p(url), "rb")

    def ls(self, url: str) -> list[str]:
        """URLs of the files directly under `url` (empty when it does not exist)."""
        try:
            entries = self.fs.ls(self._p(url), detail=True)
        except FileNotFoundError:
            return []
        files = (e["name"] for e in entries if e.get("type") == "file")
        return sorted(self._url(n) for n in files if not n.endswith("/") and n != self._p(url).rstrip("/"))

    def subdirs(self, url: str) -> list[str]:
        """Names of the folders directly under `url` (empty when it does not exist)."""
        try:
            entries = self.fs.ls(self._p(url), detail=True)
        except FileNotFoundError:
            return []
        return sorted(str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def isdir(self, url: str) -> bool:
        try:
            return bool(self.fs.isdir(self._p(url)))
        except FileNotFoundError:
            return False

    def modified(self, url: str) -> Any:
        """The object's modification time (a datetime); raises where the filesystem does not say."""
        return self.fs.modified(self._p(url))

    def glob(self, pattern: str) -> list[str]:
        return sorted(self._url(p) for p in self.fs.glob(self._p(pattern)))

    def get_file(self, url: str, local_path: str) -> None:
        self.fs.get_file(self._p(url), local_path)

    def mirror(self, url: str, local_root: str) -> str:
        """A local path with the content of `url` (a file or a folder): `url` itself on a local store; on S3 a copy
        at `local_root/<digest>/<name>`, the digest taken over the URL and its listing (names, sizes), so changed
        content gets a new copy. Downloaded once; completed by an atomic rename, so an interrupted download is never
        taken for a copy."""
        if not self.is_s3:
            return url
        prefix = self._p(url).rstrip("/")
        listing = self.fs.find(prefix, detail=True)
        if not listing:
            raise FileNotFoundError(f"nothing on the store at {url}")
        digest = hashlib.sha256(url.encode())
        for name in sorted(listing):
            digest.update(f"\0{name}\0{listing[name].get('size')}".encode())
        name = prefix.rsplit("/", 1)[-1]
        home = os.path.join(local_root, digest.hexdigest()[:24])
        if os.path.exists(os.path.join(home, name)):
            return os.path.join(home, name)
        os.makedirs(local_root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".mirror-", dir=local_root)
        for f in sorted(listing):
            out = os.path.join(tmp, name, f[len(prefix) + 1 :]) if f != prefix else os.path.join(tmp, name)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            self.fs.get_file(f, out)
        try:
            os.rename(tmp, home)
        except OSError:  # another process finished the same copy first
            shutil.rmtree(tmp, ignore_errors=True)
        return os.path.join(home, name)

    # -- atomic writes
    @contextmanager
    def writing(self, url: str, content_type: str | None = None) -> Iterator[str]:
        """Yield a local temp path; on success it becomes `url` atomically, on error nothing is visible."""
        if self.is_s3:
            fd, tmp = tempfile.mkstemp(prefix="diffsae-up-")
        else:
            os.makedirs(os.path.dirname(url), exist_ok=True)
            name = os.path.basename(url)
            fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name}-", dir=os.path.dirname(url))
        os.close(fd)
        try:
            yield tmp
            if self.is_s3:
                kwargs = {"ContentType": content_type} if content_type else {}
                self.fs.put_file(tmp, self._p(url), **kwargs)
            else:
                os.replace(tmp, url)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def write_bytes(self, url: str, data: bytes, content_type: str | None = None) -> None:
        if self.is_s3:
            kwargs = {"ContentType": content_type} if content_type else {}
            self.fs.pipe_file(self._p(url), data, **kwargs)  # one PUT: visible only when complete
            return
        with self.writing(url) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)

    def write_json(self, url: str, obj: Any) -> None:
        self.write_bytes(url, json.dumps(obj, indent=2, sort_keys=True).encode(), "application/json")

    def put_file(self, local_path: str, url: str, content_type: str | None = None) -> None:
        with self.writing(url, content_type) as tmp:
            shutil.copyfile(local_path, tmp)

    def put_tree(self, local_dir: str, url: str) -> None:
        """Upload every file under `local_dir` to `url/<relative path>` (each atomically)."""
        for dirpath, _, names in sorted(os.walk(local_dir)):
            for name in sorted(names):
                src = os.path.join(dirpath, name)
                rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
                self.put_file(src, f"{url.rstrip('/')}/{rel}")

    def write_parquet(self, url: str, table: Any, **kwargs: Any) -> int:
        """Write a pyarrow Table atomically; returns the byte size."""
        import pyarrow.parquet as pq

        with self.writing(url, "application/vnd.apache.parquet") as tmp:
            pq.write_table(table, tmp, **kwargs)
            size = os.path.getsize(tmp)
        return size

    def read_parquet(self, url: str, columns: list[str] | None = None) -> Any:
        import pyarrow.parquet as pq

        if self.is_s3:
            return pq.read_table(io.BytesIO(self.read_bytes(url)), columns=columns)
        return pq.read_table(url, columns=columns)

    # -- deletes
    def delete(self, url: str) -> None:
        try:
            self.fs.rm_file(self._p(url))
        except FileNotFoundError:
            pass

    def delete_tree(self, url: str) -> None:
        if self.fs.exists(self._p(url)):
            self.fs.rm(self._p(url), recursive=True)
