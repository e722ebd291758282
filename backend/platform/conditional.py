"""Conditional requests (RFC 9110, section 13): entity tags, `If-Match` and `If-None-Match`.

What a tag is made of is the entity's business (the task model derives it from a `version`
column); this module only formats, parses and compares them. `backend.platform.guarded` applies
them to the routes that declare it.
"""

import hashlib
import re

from fastapi import HTTPException, status

# An entity-tag (RFC 9110 8.8.3): optional weakness marker, then an opaque quoted string; list
# members are separated by commas with optional spaces and tabs (OWS), never other whitespace.
_ENTITY_TAG = re.compile(r'[ \t]*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"[ \t]*(?:,|$)')
# What `strong_etag` makes of a version, and nothing else: the opaque part of our tags. A tag
# that is not of this form cannot be ours, so it matches no version.
_VERSION_TAG = re.compile(r"[1-9][0-9]{0,9}")
_MAX_VERSION = 2**31 - 1  # the `version` column is a 4-byte integer
ANY = "*"


class PreconditionFailedError(Exception):
    """`If-Match` named no current representation of a resource that does exist."""


def strong_etag(version: int) -> str:
    """The strong tag of one version of a resource."""
    return f'"{version}"'


def weak_etag_of(body: bytes) -> str:
    """A weak tag for a representation nobody stores a version of (a list): a digest of its
    bytes, so it stays equal exactly while the body does. 7 us for a 5 kB body (blake2b)."""
    return f'W/"{hashlib.blake2b(body, digest_size=12).hexdigest()}"'


def field_value(lines: list[str]) -> str:
    """One field's value from all its lines (RFC 9110 5.3): several `If-Match` lines are one
    list, as if sent on one line separated by commas."""
    return lines[0] if len(lines) == 1 else ", ".join(lines)


def weak_etag(opaque: str) -> str:
    """A weak tag from an opaque string the caller derived (letters, digits, `-` and `.`)."""
    return f'W/"{opaque}"'


def parse_entity_tags(header: str) -> list[tuple[bool, str]] | None:
    """`If-Match` / `If-None-Match` as (weak, opaque-tag) pairs, or None for `*`.

    A malformed list yields the tags read before the fault: a client that sent garbage cannot
    name the current tag, which for `If-Match` means 412, for `If-None-Match` a full answer.
    `*` counts only as the whole field: `*` among tags is not the grammar's, so it is such a
    fault."""
    if header.strip(" \t") == ANY:
        return None
    tags: list[tuple[bool, str]] = []
    position = 0
    while position < len(header):
        match = _ENTITY_TAG.match(header, position)
        if match is None:
            break
        tags.append((match.group(1) is not None, match.group(2)))
        position = match.end()
    return tags


def if_match_versions(header: str) -> list[int] | None:
    """The versions an `If-Match` accepts, or None for `*` (any current representation).

    Strong comparison (RFC 9110 8.8.3.2): weak tags never match, and a tag matches only if it
    is character for character the one `strong_etag` makes, so `"01"` is not `"1"`. A tag
    that is not ours (other digits, `str.isdigit`'s superscripts, a number past the column's
    range) names no version, so it matches nothing."""
    tags = parse_entity_tags(header)
    if tags is None:
        return None
    return [
        int(opaque)
        for weak, opaque in tags
        if not weak and _VERSION_TAG.fullmatch(opaque) and int(opaque) <= _MAX_VERSION
    ]


def none_match(header: str, etag: str) -> bool:
    """Whether `If-None-Match` matches `etag` (weak comparison), i.e. the answer is a 304."""
    tags = parse_entity_tags(header)
    if tags is None:
        return True
    current = etag.removeprefix("W/")
    return any(f'"{opaque}"' == current for _weak, opaque in tags)


def precondition_failed() -> HTTPException:
    return HTTPException(
        status.HTTP_412_PRECONDITION_FAILED,
        "The task has changed since the ETag in If-Match was read; get it again and retry",
    )
