"""The key ring (`pier.router.auth.keys`): app keys, user keys, keys from a file, certificates as
identity, and the open router; and how a request presents its key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from pier.core.errors import PierError
from pier.router.auth.keys import KeyRing, Principal, presented_key

pytestmark = pytest.mark.unit

APP, ALICE, BOB = "app-key-0123456789", "alice-key-0123456789", "bob-key-0123456789"


def ring(closed: bool = False) -> KeyRing:
    return KeyRing([APP], {ALICE: "alice", BOB: "bob"}, closed)


def refused(keys: KeyRing, key: str | None, subject: str | None = None, cert_users: bool = False) -> PierError:
    with pytest.raises(PierError) as caught:
        keys.authenticate(key, subject, cert_users)
    return caught.value


def test_an_app_key_acts_for_anyone() -> None:
    principal = ring().authenticate(APP)
    assert principal.key_class == "app"
    assert principal.user_id is None
    principal.check_user("alice")
    principal.check_user("anyone-else")


def test_a_user_key_acts_only_for_its_user() -> None:
    principal = ring().authenticate(ALICE)
    assert (principal.key_class, principal.user_id) == ("user", "alice")
    principal.check_user("alice")
    with pytest.raises(PierError) as caught:
        principal.check_user("bob")
    assert caught.value.code == "FORBIDDEN"


def test_key_ids_are_short_digests_never_the_key() -> None:
    keys = ring()
    ids = {keys.authenticate(key).key_id for key in (APP, ALICE, BOB)}
    assert len(ids) == 3
    assert ring().authenticate(APP).key_id == hashlib.sha256(APP.encode()).hexdigest()[:12]
    for key in (APP, ALICE, BOB):
        principal = keys.authenticate(key)
        assert key not in repr(principal)
        assert key not in str(principal.identity())


@pytest.mark.parametrize("key", ["", "app-key", APP + " ", APP.upper(), "x" * 4096, ALICE[:-1]])
def test_a_key_that_is_not_configured_is_refused_as_invalid(key: str) -> None:
    err = refused(ring(), key)
    assert (err.code, err.http_status, err.details) == ("UNAUTHENTICATED", 401, {"reason": "invalid"})
    assert key not in err.message or not key


def test_no_key_is_refused_as_missing() -> None:
    err = refused(ring(), None)
    assert (err.code, err.details) == ("UNAUTHENTICATED", {"reason": "missing"})


def test_with_no_keys_the_router_is_open_to_anyone() -> None:
    keys = KeyRing([], {})
    assert keys.open
    principal = keys.authenticate(None)
    assert (principal.key_class, principal.key_id, principal.user_id) == ("open", "open", None)
    assert keys.authenticate("whatever").key_class == "open"


def test_no_keys_but_other_credentials_is_closed() -> None:
    # Tokens from an identity provider are accepted elsewhere; no key means no key, not an open door.
    keys = KeyRing([], {}, closed=True)
    assert not keys.open
    assert refused(keys, None).details == {"reason": "missing"}
    assert refused(keys, "anything").details == {"reason": "invalid"}


def test_a_certificate_names_its_user_only_when_certificates_are_identity() -> None:
    subject = "commonName=carol,organizationName=Example"  # as `peer_subject` writes it
    principal = ring().authenticate(None, subject, cert_users=True)
    assert (principal.key_class, principal.user_id, principal.subject) == ("user", "carol", subject)
    assert principal.key_id.startswith("cert:")
    assert "carol" not in principal.key_id
    assert refused(ring(), None, subject, cert_users=False).details == {"reason": "missing"}
    # A key, when given, decides; the certificate's subject rides along for the audit record.
    with_key = ring().authenticate(APP, subject, cert_users=True)
    assert (with_key.key_class, with_key.subject) == ("app", subject)


def test_a_certificate_without_a_common_name_is_no_identity() -> None:
    assert refused(ring(), None, "organizationName=Example", cert_users=True).details == {"reason": "missing"}


def test_keys_from_a_file_join_the_configured_ones(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("app_keys: [file-app-key]\nuser_keys: {file-dave-key: dave}\n")
    keys = KeyRing.load([APP], {ALICE: "alice"}, path)
    assert keys.authenticate("file-app-key").key_class == "app"
    assert keys.authenticate("file-dave-key").user_id == "dave"
    assert keys.authenticate(APP).key_class == "app"
    assert keys.authenticate(ALICE).user_id == "alice"


def test_an_empty_keys_file_adds_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("")
    assert KeyRing.load([], {}, path).open


def test_a_keys_file_with_unknown_fields_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("app_keys: [a]\nadmin_keys: [b]\n")
    with pytest.raises(ValueError, match="admin_keys"):
        KeyRing.load([], {}, path)


def test_the_identity_for_audit_and_policy_carries_no_secret() -> None:
    principal = Principal("token", "oidc:abc", "alice", claims={"sub": "alice"}, groups=("ops",))
    assert principal.identity() == {
        "key_class": "token", "key_id": "oidc:abc", "bound_user": "alice", "subject": None, "claims": {"sub": "alice"},
    }  # fmt: skip
    assert "claims" not in ring().authenticate(APP).identity()


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"Authorization": "Bearer abc"}, "abc"),
        ({"Authorization": "bearer abc"}, "abc"),
        ({"Authorization": "BEARER   abc  "}, "abc"),
        ({"Authorization": "Bearer "}, None),
        ({"Authorization": "Basic abc"}, None),
        ({"X-API-Key": "xyz"}, "xyz"),
        ({"X-API-Key": ""}, None),
        ({"Authorization": "Bearer abc", "X-API-Key": "xyz"}, "abc"),  # the bearer token wins
        ({"Authorization": "Basic abc", "X-API-Key": "xyz"}, "xyz"),
        ({}, None),
    ],
)
def test_the_key_a_request_presents(headers: dict[str, str], key: str | None) -> None:
    # A request object as aiohttp builds it (no server needed to read headers).
    assert presented_key(make_mocked_request("GET", "/v1/servers", headers=headers)) == key
