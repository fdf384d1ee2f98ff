"""Media types: parse a ``Content-Type`` value and negotiate a response type from ``Accept``.

Media types are case-insensitive (RFC 9110); parameters such as ``charset=utf-8`` or
``label_size=1`` are kept, with quoted values unquoted. ``negotiate`` applies the rtbserve
choice from the SageMaker contract: no ``Accept`` (or ``*/*``) yields the configured default,
an ``Accept`` list picks the best supported type by q-value and then by list order, and
nothing supported raises ``NotAcceptable``. Transport-neutral: callers pass header strings.
"""

from __future__ import annotations

from rtbserve.errors import NotAcceptable, UnsupportedMediaType


def _split_params(value: str) -> list[str]:
    """Split on ';' outside double quotes."""
    parts: list[str] = []
    start = 0
    in_quotes = False
    escaped = False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quotes:
            escaped = True
        elif ch == '"':
            in_quotes = not in_quotes
        elif ch == ";" and not in_quotes:
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return parts


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        inner = value[1:-1]
        out = []
        escaped = False
        for ch in inner:
            if escaped:
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            else:
                out.append(ch)
        return "".join(out)
    return value


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """Parse ``"Text/CSV; charset=UTF-8; label_size=1"`` into ``("text/csv", {...})``.

    The type/subtype and parameter names are lower-cased; parameter values are unquoted and
    otherwise kept as sent (compare ``charset`` case-insensitively). Spaces around every part
    are tolerated; parameters without ``=`` are ignored. Raises ``UnsupportedMediaType`` when
    the value has no ``type/subtype``.
    """
    parts = _split_params(value)
    full = parts[0].strip().lower()
    kind, slash, sub = full.partition("/")
    kind, sub = kind.strip(), sub.strip()
    if not slash or not kind or not sub or "/" in sub or " " in kind or " " in sub:
        raise UnsupportedMediaType(
            f"malformed media type {value!r}; expected 'type/subtype', e.g. 'text/csv'"
        )
    params: dict[str, str] = {}
    for part in parts[1:]:
        name, eq, raw = part.partition("=")
        name = name.strip().lower()
        if eq and name:
            params[name] = _unquote(raw.strip())
    return f"{kind}/{sub}", params


def _q_value(params: dict[str, str]) -> float | None:
    """The entry's q in [0, 1], 1.0 when absent, None when malformed (entry is ignored)."""
    raw = params.get("q")
    if raw is None:
        return 1.0
    try:
        q = float(raw)
    except ValueError:
        return None
    if not 0.0 <= q <= 1.0:  # also rejects nan
        return None
    return q


def negotiate(accept: str | None, supported: tuple[str, ...], default: str) -> str:
    """Pick the response media type for an ``Accept`` header value.

    ``accept``: the raw header value or None. ``supported``: the concrete types we can
    produce, lower-case. ``default``: returned for a missing/empty ``Accept`` and preferred
    among equally good matches (``*/*``, ``text/*``).

    Each supported type gets the q of the most specific range that matches it (exact, then
    ``type/*``, then ``*/*``); q=0 excludes it. The winner has the highest q; ties go to the
    range listed first, then to ``default``, then to the order of ``supported``. Malformed
    entries are skipped. Raises ``NotAcceptable`` naming the supported types when none fits.
    """
    if accept is None or not accept.strip():
        return default
    ranges: list[tuple[str, float]] = []
    for entry in accept.split(","):
        if not entry.strip():
            continue
        try:
            media, params = parse_media_type(entry)
        except UnsupportedMediaType:
            continue
        q = _q_value(params)
        if q is not None:
            ranges.append((media, q))

    best: tuple[float, int, int, int] | None = None
    chosen = None
    for order, media in enumerate(supported):
        kind = media.partition("/")[0]
        match: tuple[int, float, int] | None = None  # (specificity, q, position)
        for pos, (rng, q) in enumerate(ranges):
            if rng == media:
                spec = 2
            elif rng == f"{kind}/*":
                spec = 1
            elif rng == "*/*":
                spec = 0
            else:
                continue
            if match is None or spec > match[0]:
                match = (spec, q, pos)
        if match is None or match[1] <= 0.0:
            continue
        key = (-match[1], match[2], 0 if media == default else 1, order)
        if best is None or key < best:
            best, chosen = key, media
    if chosen is None:
        raise NotAcceptable(
            f"cannot produce any type in Accept {accept!r}; supported: {', '.join(supported)}"
        )
    return chosen
