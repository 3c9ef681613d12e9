"""An S3-compatible object store (SeaweedFS, Ceph RGW, MinIO, AWS S3) through boto3.

Why boto3 in threads: every caller of the blob store is already a thread (pynetdicom runs one per
association, the transfer client's put pool, ``asyncio.to_thread``), boto3's client is
thread-safe with a connection pool, its ``standard`` retry mode retries throttling, 5xx and
connection resets with exponential backoff and jitter, and s3transfer does multipart uploads;
measured against obstore on the same bytes in ``bench/object_store.py`` (docs/benchmarks.md).

Health: the first request that cannot reach the store (after botocore's retries) marks it down;
while down, requests fail at once (``ObjectStoreUnavailableError``, C-STORE status 0xA700) except
one try per ``OBJECT_PROBE_INTERVAL``, whose success marks it up again, so ingest resumes by
itself. Credentials never appear in a log line, an error or ``status``.
"""

from __future__ import annotations

import io
import logging
import stat
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import boto3
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from p2pacs import const
from p2pacs.config import StoreConfig
from p2pacs.errors import (
    ConfigError,
    CorruptBlobError,
    ObjectStoreUnavailableError,
    StoreError,
)

__all__ = ["S3ObjectStore", "boto_config", "load_credentials", "open_object_store"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_UNAVAILABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeTooSkewed",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound", "InvalidRange"}
_STREAM_ERRORS = (BotoCoreError, urllib3.exceptions.HTTPError, OSError)


def load_credentials(path: Path) -> tuple[str, str]:
    """(access key id, secret) from a TOML file only its owner can read (mode 0600)."""
    try:
        mode = path.stat().st_mode
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the S3 credentials file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the S3 credentials file {path} is not TOML: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"the S3 credentials file {path} is readable by others (mode {stat.filemode(mode)}): "
            f"chmod 600 {path}"
        )
    key, secret = raw.get("access_key_id"), raw.get("secret_access_key")
    if not isinstance(key, str) or not isinstance(secret, str) or not key or not secret:
        raise ConfigError(f"{path} must set access_key_id and secret_access_key (strings)")
    return key, secret


def open_object_store(st: StoreConfig, site_dir: Path) -> S3ObjectStore | None:
    """The object store a site's config names, or None when it names none."""
    if not st.s3_bucket:
        return None
    creds = None
    if st.s3_credentials_file:
        path = Path(st.s3_credentials_file)
        creds = load_credentials(path if path.is_absolute() else site_dir / path)
    return S3ObjectStore(st, creds)


def boto_config(st: StoreConfig) -> BotoConfig:
    """The botocore settings of a site's client (``bench/object_store.py`` uses them too).

    No CRC32 of every body (botocore's default since 1.36): it costs CPU on each PUT and GET,
    while every byte read back is BLAKE3-checked against its address anyway (a bad PUT is found
    at the first read or scrub and repaired from a peer), and TLS protects it on the wire."""
    return BotoConfig(
        region_name=st.s3_region,
        signature_version="s3v4",
        s3={"addressing_style": st.s3_addressing},
        retries={"mode": "standard", "max_attempts": const.OBJECT_MAX_ATTEMPTS},
        connect_timeout=const.OBJECT_CONNECT_TIMEOUT,
        read_timeout=const.OBJECT_READ_TIMEOUT,
        max_pool_connections=const.OBJECT_POOL,
        tcp_keepalive=True,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


class S3ObjectStore:
    """``ObjectStore`` on one bucket of an S3-compatible service."""

    def __init__(self, st: StoreConfig, credentials: tuple[str, str] | None = None):
        self.endpoint = st.s3_endpoint or f"https://s3.{st.s3_region}.amazonaws.com"
        self.bucket = st.s3_bucket
        self.prefix = st.s3_prefix
        verify: bool | str = st.s3_verify_tls
        if st.s3_verify_tls and st.s3_ca_bundle:
            verify = st.s3_ca_bundle
        config = boto_config(st)
        keys: dict[str, str] = {}
        if credentials is not None:
            keys = {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]}
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=st.s3_endpoint or None, verify=verify, config=config, **keys
        )
        self._transfer = TransferConfig(
            multipart_threshold=st.s3_multipart_threshold,
            multipart_chunksize=st.s3_multipart_threshold,
            max_concurrency=4,
            use_threads=True,
        )
        self._lock = threading.Lock()
        self._up = True
        self._since = time.time()
        self._last_try = 0.0
        self._last_error = ""
        self.counts = {"put": 0, "get": 0, "delete": 0, "failed": 0}

    def __repr__(self) -> str:  # never the credentials
        return f"S3ObjectStore({self.endpoint}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    # --- health ---------------------------------------------------------------------------------

    def _gate(self) -> None:
        """Fail at once while the store is down, but let one try through per probe interval."""
        with self._lock:
            if self._up:
                return
            now = time.monotonic()
            if now - self._last_try >= const.OBJECT_PROBE_INTERVAL:
                self._last_try = now
                return
            error = self._last_error
        raise ObjectStoreUnavailableError(
            f"the object store {self.endpoint} bucket {self.bucket} is unreachable ({error}); "
            "nothing was stored: send again later (retrying by itself every "
            f"{const.OBJECT_PROBE_INTERVAL:.0f} s)"
        )

    def _mark(self, up: bool, error: str = "") -> None:
        with self._lock:
            if up != self._up:
                self._since = time.time()
                where = f"object store {self.endpoint} bucket {self.bucket}"
                if up:
                    log.warning("%s answers again", where)
                else:
                    log.error("%s is down: %s", where, error)
            self._up = up
            if not up:
                self._last_error = error
                self._last_try = time.monotonic()
                self.counts["failed"] += 1

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """Run one request, translating botocore's errors into p2pacs's."""
        self._gate()
        try:
            result = fn()
        except ClientError as exc:
            raise self._client_error(what, key, exc) from exc
        except NoCredentialsError as exc:
            raise StoreError(
                f"no credentials for the object store {self.endpoint}: set "
                "store.s3_credentials_file (a 0600 TOML file) or AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY in the site's environment"
            ) from exc
        except _STREAM_ERRORS as exc:
            self._mark(False, type(exc).__name__)
            raise ObjectStoreUnavailableError(
                f"object store {self.endpoint} unreachable during {what} {key}: {exc}"
            ) from exc
        self._mark(True)
        return result

    def _client_error(self, what: str, key: str, exc: ClientError) -> StoreError:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if status >= 500 or code in _UNAVAILABLE_CODES:
            self._mark(False, f"{code or status}")
            return ObjectStoreUnavailableError(
                f"object store {self.endpoint} refused {what} {key} ({code or status}) "
                "after retries; nothing was stored"
            )
        self._mark(True)  # it answered: the store is up, the request was wrong
        if code == "NoSuchBucket":  # a configuration problem, never a reason to "repair"
            return StoreError(
                f"bucket {self.bucket} does not exist at {self.endpoint}: check store.s3_bucket"
            )
        if code in _MISSING_CODES or status in (404, 416):
            return CorruptBlobError(
                f"object {key} is missing from bucket {self.bucket} ({code or status}); "
                "repair it from a peer"
            )
        return StoreError(f"object store refused {what} {key} in bucket {self.bucket}: {code}")

    def health(self) -> dict[str, object]:
        with self._lock:
            return {
                "endpoint": self.endpoint,
                "bucket": self.bucket,
                "prefix": self.prefix,
                "reachable": self._up,
                "since": round(self._since, 3),
                "last_error": "" if self._up else self._last_error,
                **self.counts,
            }

    def check(self) -> None:
        try:
            self._call(
                "HEAD bucket", self.bucket, lambda: self._client.head_bucket(Bucket=self.bucket)
            )
        except CorruptBlobError as exc:  # a 404 here is the bucket, not an object
            raise StoreError(
                f"bucket {self.bucket} does not exist at {self.endpoint}: create it "
                "(docs/operations.md, 'Instance bytes on an object store')"
            ) from exc

    # --- objects --------------------------------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview) -> None:
        if len(data) >= self._transfer.multipart_threshold:
            self.put_file(key, io.BytesIO(data), len(data))
            return
        body = bytes(data) if isinstance(data, memoryview) else data
        self._call(
            "PUT", key, lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=body)
        )
        with self._lock:
            self.counts["put"] += 1

    def put_file(self, key: str, file: IO[bytes], size: int) -> None:
        def upload() -> None:
            self._client.upload_fileobj(file, self.bucket, key, Config=self._transfer)

        try:
            self._call("multipart PUT", key, upload)
        except StoreError:
            raise
        except Exception as exc:  # s3transfer wraps the client's errors in its own
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ClientError):
                raise self._client_error("multipart PUT", key, cause) from exc
            self._mark(False, type(exc).__name__)
            raise ObjectStoreUnavailableError(f"multipart PUT of {key} failed: {exc}") from exc
        with self._lock:
            self.counts["put"] += 1

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        if end <= start:
            return
        rng = f"bytes={start}-{end - 1}"
        response = self._call(
            "GET",
            key,
            lambda: self._client.get_object(Bucket=self.bucket, Key=key, Range=rng),
        )
        with self._lock:
            self.counts["get"] += 1
        body = response["Body"]
        got = 0
        try:
            for piece in body.iter_chunks(const.CHUNK_SIZE):
                got += len(piece)
                yield piece
        except _STREAM_ERRORS as exc:
            self._mark(False, type(exc).__name__)
            raise ObjectStoreUnavailableError(f"GET {key} was cut off after {got} bytes") from exc
        finally:
            body.close()
        if got != end - start:
            raise CorruptBlobError(
                f"object {key} gave {got} of {end - start} bytes asked for; repair it from a peer"
            )

    def delete(self, key: str) -> None:
        self._call("DELETE", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=key))
        with self._lock:
            self.counts["delete"] += 1

    def list(self) -> Iterator[tuple[str, float]]:
        paginator = self._client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix))
        while True:
            page = self._call("LIST", self.prefix, lambda: next(pages, None))
            if page is None:
                return
            for item in page.get("Contents", []):
                yield str(item["Key"]), float(item["LastModified"].timestamp())
