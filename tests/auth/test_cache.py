"""The verified-credential cache: keyed digests only, bounded, expiring, tied to the stored hash."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st

from popproxy.auth.cache import DIGEST_KEY_BYTES, CredentialCache
from popproxy.secret import Secret

HASH = "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA"
OTHER_HASH = "$scrypt$ln=4,r=8,p=1$b3RoZXJzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaA"


def test_a_stored_credential_hits_until_it_expires() -> None:
    cache = CredentialCache(4)
    digest = cache.digest("alice", Secret.from_str("pw"))
    cache.store("alice", digest, HASH, now=0.0, ttl=60.0)
    assert cache.hit("alice", digest, HASH, now=59.9)
    assert not cache.hit("alice", digest, HASH, now=60.0)
    assert len(cache) == 0  # an expired entry is dropped when found


def test_another_password_or_user_misses() -> None:
    cache = CredentialCache(4)
    cache.store("alice", cache.digest("alice", Secret.from_str("pw")), HASH, now=0.0, ttl=60.0)
    assert not cache.hit("alice", cache.digest("alice", Secret.from_str("pw2")), HASH, now=1.0)
    assert not cache.hit("bob", cache.digest("bob", Secret.from_str("pw")), HASH, now=1.0)
    assert cache.hit("alice", cache.digest("alice", Secret.from_str("pw")), HASH, now=1.0)


def test_a_changed_password_hash_invalidates_the_entry() -> None:
    cache = CredentialCache(4)
    digest = cache.digest("alice", Secret.from_str("pw"))
    cache.store("alice", digest, HASH, now=0.0, ttl=60.0)
    assert not cache.hit("alice", digest, OTHER_HASH, now=1.0)
    assert not cache.hit("alice", digest, HASH, now=1.0)  # and it is gone for good


def test_retain_drops_removed_and_changed_users() -> None:
    cache = CredentialCache(8)
    for name in ("alice", "bob", "carol"):
        cache.store(name, cache.digest(name, Secret.from_str("pw")), HASH, now=0.0, ttl=60.0)
    cache.retain({"alice": HASH, "bob": OTHER_HASH})
    assert len(cache) == 1
    assert cache.hit("alice", cache.digest("alice", Secret.from_str("pw")), HASH, now=1.0)


def test_least_recently_used_is_evicted_and_resize_shrinks() -> None:
    cache = CredentialCache(2)
    digests = {name: cache.digest(name, Secret.from_str("pw")) for name in ("a", "b", "c")}
    cache.store("a", digests["a"], HASH, now=0.0, ttl=60.0)
    cache.store("b", digests["b"], HASH, now=0.0, ttl=60.0)
    assert cache.hit("a", digests["a"], HASH, now=1.0)  # "b" is now the least recent
    cache.store("c", digests["c"], HASH, now=1.0, ttl=60.0)
    assert not cache.hit("b", digests["b"], HASH, now=1.0)
    assert cache.hit("a", digests["a"], HASH, now=1.0)
    cache.resize(1)
    assert len(cache) == 1
    assert cache.hit("a", digests["a"], HASH, now=1.0)


def test_size_zero_or_ttl_zero_stores_nothing() -> None:
    for size, ttl in ((0, 60.0), (4, 0.0)):
        cache = CredentialCache(size)
        digest = cache.digest("alice", Secret.from_str("pw"))
        cache.store("alice", digest, HASH, now=0.0, ttl=ttl)
        assert len(cache) == 0
        assert not cache.hit("alice", digest, HASH, now=0.0)


def test_the_digest_is_keyed_per_process_and_holds_no_password() -> None:
    one, two = CredentialCache(1), CredentialCache(1)
    password = Secret.from_str("correct horse battery staple")
    first = one.digest("alice", password)
    assert len(first) == 32
    assert first != two.digest("alice", password)  # a random key each
    assert password.reveal() not in first
    assert repr(password.reveal())[2:-1] not in repr(one._entries)
    assert len(one._key) == DIGEST_KEY_BYTES


def test_an_entry_repr_shows_no_digest() -> None:
    cache = CredentialCache(1, key=b"k" * DIGEST_KEY_BYTES)
    digest = cache.digest("alice", Secret.from_str("pw"))
    cache.store("alice", digest, HASH, now=0.0, ttl=60.0)
    assert digest.hex() not in repr(cache._entries)
    assert repr(digest) not in repr(cache._entries)


@given(
    a=st.tuples(st.text(max_size=8), st.binary(max_size=8)),
    b=st.tuples(st.text(max_size=8), st.binary(max_size=8)),
)
def test_distinct_user_password_pairs_get_distinct_digests(
    a: tuple[str, bytes], b: tuple[str, bytes]
) -> None:
    """The name is length-prefixed: ("ab", "c") and ("a", "bc") do not collide."""
    cache = CredentialCache(1, key=b"k" * DIGEST_KEY_BYTES)
    same = cache.digest(a[0], Secret(a[1])) == cache.digest(b[0], Secret(b[1]))
    assert same == (a == b)


@given(st.text(max_size=16), st.binary(max_size=16))
def test_the_digest_is_hmac_sha256_of_the_length_prefixed_name_and_password(
    user: str, password: bytes
) -> None:
    key = b"k" * DIGEST_KEY_BYTES
    cache = CredentialCache(1, key=key)
    name = user.encode("utf-8", "surrogateescape")
    message = len(name).to_bytes(4, "big") + name + password
    expected = hmac.new(key, message, hashlib.sha256).digest()
    assert cache.digest(user, Secret(password)) == expected
    assert cache.digest(user, Secret(password)) == expected  # the keyed state is not used up
