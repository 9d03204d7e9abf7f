"""What the remote store needs besides the store itself: the
classification of errors as permanent, and the fsspec options for a URL. No ML imports."""
from __future__ import annotations

import errno
import os
from typing import Any, Mapping

from spotckpt._errors import CorruptCheckpointError
from spotckpt._events import redact


def _cause(e: BaseException) -> str:
    return redact(f"{type(e).__name__}: {e}".strip())[:300]


def _is_permanent(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True  # the local disk is full: retrying the download cannot help
    name = type(e).__name__
    if any(s in name for s in ("NoCredentials", "PartialCredentials", "InvalidAccessKey",
                                "SignatureDoesNotMatch", "NoSuchBucket", "ParamValidation")):
        return True
    return isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError,
                          NotADirectoryError, ValueError, TypeError, CorruptCheckpointError))


def storage_options_for(url: str, given: Mapping[str, Any] | None = None,
                        env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """fsspec options for ``url``, following the AWS variables users already set."""
    env = os.environ if env is None else env
    opts: dict[str, Any] = dict(given or {})
    scheme = url.split("://", 1)[0].lower()
    if scheme == "s3":
        ck = dict(opts.get("client_kwargs") or {})
        ep = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if ep and "endpoint_url" not in ck and "endpoint_url" not in opts:
            ck["endpoint_url"] = ep
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region and "region_name" not in ck:
            ck["region_name"] = region
        opts["client_kwargs"] = ck
        # One retry budget, RemoteStore's (attempts, backoff). botocore may retry a request
        # once, so one failed multipart part does not restart a whole upload; s3fs's own
        # loop is off (RemoteStore.__init__). Nested, the three multiplied to 150 requests
        # and four minutes before an error when S3 answered 503 to everything.
        cfg = dict(opts.get("config_kwargs") or {})
        cfg.setdefault("retries", {"total_max_attempts": 2, "mode": "standard"})
        opts["config_kwargs"] = cfg
        opts.setdefault("use_listings_cache", False)
    elif scheme in ("file", "local"):
        opts.setdefault("auto_mkdir", True)
    opts.setdefault("skip_instance_cache", True)
    return opts
