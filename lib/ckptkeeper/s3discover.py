"""``[[discover]] glob = "s3://bucket/runs/*"``: the prefixes a glob names that hold checkpoints.

The glob's literal head is the listing prefix; each segment with ``*``, ``?`` or ``[`` is matched
(`fnmatch`, not crossing ``/``) against the "sub-directories" of one delimiter listing. A match
is a root when a delimiter listing of it shows a checkpoint-named prefix, and it is not itself a
checkpoint nor inside ``.ckptkeeper``.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from .names import parse_name
from .s3client import make_client, os_error
from .stores import split_url

__all__ = ["discover_s3"]

_MAGIC = re.compile(r"[*?\[]")


def _children(client: Any, bucket: str, prefix: str) -> list[str]:
    """Names of the "directories" directly below ``prefix`` (ending in ``/`` or empty)."""
    names: list[str] = []
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, Delimiter="/"
    )
    for page in pages:
        names += [
            str(p["Prefix"])[len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", ())
        ]
    return names


def discover_s3(glob: str, problems: list[str], client: Any = None) -> list[str]:
    """``s3://`` URLs of the roots ``glob`` finds; problems are described, never raised."""
    try:
        bucket, pattern = split_url(glob)
        s3 = client if client is not None else make_client()
        segments = [s for s in pattern.split("/") if s]
        literal = next((i for i, s in enumerate(segments) if _MAGIC.search(s)), len(segments))
        heads = ["".join(s + "/" for s in segments[:literal])]
        for segment in segments[literal:]:
            heads = [
                f"{head}{name}/"
                for head in heads
                for name in _children(s3, bucket, head)
                if fnmatch.fnmatchcase(name, segment)
                and parse_name(name) is None
                and name != ".ckptkeeper"
            ]
        found = [h for h in heads if any(parse_name(n) for n in _children(s3, bucket, h))]
    except ValueError as exc:
        problems.append(f"discover {glob!r}: {exc}")
        return []
    except Exception as exc:
        problems.append(f"discover {glob!r}: {os_error(exc, glob).strerror}")
        return []
    return [f"s3://{bucket}/{h.rstrip('/')}" for h in sorted(found)]
