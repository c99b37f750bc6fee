"""The names Pier accepts from outside — user ids and profile names — one definition each.

Patterns are written without anchors; code matches them whole (`fullmatch`: a pattern ending in
`$` would also accept a name followed by a newline), schemas get them anchored.
"""

from __future__ import annotations

import re

USER_ID = r"[A-Za-z0-9][A-Za-z0-9._@+=-]{0,127}"
PROFILE_NAME = r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?"
USER_ID_RULE = "user ids are 1-128 characters: letters, digits and . _ @ + = -"
# Reserved: the owner of the router's own sessions that tell what a profile's servers offer.
DISCOVERY_USER = "pier-discovery"

_USER_ID = re.compile(USER_ID)


def is_user_id(text: str) -> bool:
    return _USER_ID.fullmatch(text) is not None


def anchored(pattern: str) -> str:
    """The pattern for a JSON Schema (or pydantic) `pattern`, which searches rather than matches."""
    return f"^{pattern}$"
