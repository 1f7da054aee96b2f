"""API keys for the OpenAI-compatible API: made by an admin command, stored as hashes.

A key is "duet-" followed by 32 random bytes (URL-safe base64). It is shown once, when it is
made (`python app.py keys add USER`); the store keeps only its sha256 and a short hint that
names it in `keys list`. A request presents it as `Authorization: Bearer <key>`; the user it
was made for is the request's identity. Keys are only checked when logins are on: without
logins every request is the single local user, as local OpenAI-compatible servers do.

Left out: expiry, scopes, per-key usage counts. A user's keys are removed all at once.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

from chatbot.errors import InvalidInput
from chatbot.store import Store

log = logging.getLogger(__name__)

PREFIX = "duet-"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def add_key(store: Store, user: str) -> str:
    """Make a new key for `user`, store its hash, and return the key (shown once)."""
    user = user.strip()
    if not user or ":" in user:
        raise InvalidInput("a user name must be non-empty and have no ':'")
    key = PREFIX + secrets.token_urlsafe(32)
    store.add_api_key(user, key_hash(key), hint=key[:len(PREFIX) + 4] + "...")
    log.info("made an API key for %s", user)
    return key


def user_of_key(store: Store, key: str | None) -> str | None:
    """The user a presented key was made for, or None for a missing or unknown key."""
    if not key or not key.startswith(PREFIX):
        return None
    return store.api_key_user(key_hash(key))
