"""Bearer tokens: what verifies, and what a principal may subscribe to and publish."""

from __future__ import annotations

import time
import warnings
from typing import Any

import jwt
import pytest
from conftest import SECRET, mint_token
from support import wait_until

from notifier.auth import LEEWAY, Principal, TokenAuthority, bearer
from notifier.errors import AuthError, Forbidden

authority = TokenAuthority(SECRET)


def principal(
    sub: str = "alice", scopes: tuple[str, ...] = ("subscribe", "publish"), topics: list[str] | None = None
) -> Principal:
    return authority.verify(mint_token(sub=sub, scopes=scopes, topics=topics))


def raw_token(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    """``claims`` signed, with an ``exp`` an hour away unless they give one (or ``exp=None``: none)."""
    claims = {"exp": int(time.time()) + 3600, **claims}
    if claims["exp"] is None:
        del claims["exp"]
    return jwt.encode(claims, secret, algorithm=algorithm)


# -- verify ------------------------------------------------------------------------------------


def test_a_valid_token_gives_its_user_scopes_topics_and_expiry() -> None:
    exp = int(time.time()) + 600
    p = authority.verify(
        raw_token({"sub": "alice", "scope": "subscribe publish", "topics": ["room:*"], "exp": exp})
    )
    assert p.sub == "alice"
    assert p.scopes == {"subscribe", "publish"}
    assert p.topics == ("room:*",)
    assert p.exp == exp


def test_a_token_without_scope_or_topics_has_no_scopes_and_any_topic() -> None:
    exp = int(time.time()) + 60
    p = authority.verify(raw_token({"sub": "alice", "exp": exp}))
    assert p.scopes == frozenset()
    assert p.topics is None
    assert p.exp == exp


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "alice", "scope": "subscribe publish", "exp": None},
        {"sub": "alice", "scope": "subscribe publish", "exp": None, "iat": int(time.time())},
    ],
)
def test_a_token_without_exp_is_refused_saying_exp_is_required(claims: dict[str, Any]) -> None:
    fresh = TokenAuthority(SECRET)  # nothing remembered
    with pytest.raises(AuthError, match="'exp'.*required"):
        fresh.verify(raw_token(claims))


@pytest.mark.parametrize("token", [None, ""])
def test_a_missing_token_is_refused(token: str | None) -> None:
    with pytest.raises(AuthError, match="missing"):
        authority.verify(token)


def test_a_token_signed_with_another_secret_is_refused() -> None:
    with pytest.raises(AuthError):
        authority.verify(mint_token(secret="another-secret-0123456789abcdef0123456789"))


def test_a_tampered_token_is_refused() -> None:
    header, _, signature = mint_token(sub="alice").split(".")
    forged_payload = mint_token(sub="mallory").split(".")[1]
    with pytest.raises(AuthError):
        authority.verify(f"{header}.{forged_payload}.{signature}")


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "Bearer x", "...."])
def test_a_malformed_token_is_refused(token: str) -> None:
    with pytest.raises(AuthError):
        authority.verify(token)


def test_an_expired_token_is_refused_as_expired() -> None:
    with pytest.raises(AuthError, match="expired"):
        authority.verify(mint_token(ttl=-5))


def test_an_unsigned_token_is_refused() -> None:
    claims = {"sub": "alice", "scope": "subscribe publish", "exp": int(time.time()) + 60}
    with pytest.raises(AuthError):
        authority.verify(jwt.encode(claims, None, algorithm="none"))


def test_a_token_with_another_algorithm_is_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyJWT finds the secret short for HS512: beside the point here
        token = raw_token({"sub": "alice", "scope": "publish"}, algorithm="HS512")
    with pytest.raises(AuthError):
        authority.verify(token)


@pytest.mark.parametrize(
    "claims",
    [
        {"scope": "subscribe publish"},
        {"sub": "", "scope": "subscribe"},
        {"sub": None, "scope": "subscribe"},
        {"sub": 42, "scope": "subscribe"},
    ],
)
def test_a_token_without_a_user_is_refused(claims: dict[str, Any]) -> None:
    with pytest.raises(AuthError):
        authority.verify(raw_token(claims))


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "alice", "scope": ["subscribe", "publish"]},
        {"sub": "alice", "scope": 7},
        {"sub": "alice", "topics": "room:*"},
        {"sub": "alice", "topics": ["room:*", 3]},
        {"sub": "alice", "topics": {"room:*": True}},
        {"sub": "alice", "exp": "tomorrow"},
        {"sub": "alice", "exp": "99999999999"},
        {"sub": "alice", "exp": 10**30},
        {"sub": "alice", "exp": 1e300},
        {"sub": "\ud800", "scope": "subscribe"},
    ],
)
def test_a_token_with_badly_typed_claims_is_refused(claims: dict[str, Any]) -> None:
    with pytest.raises(AuthError):
        authority.verify(raw_token(claims))


def test_tokens_minted_by_the_authority_verify() -> None:
    p = authority.verify(authority.mint("bob", ["subscribe"], ["room:*"], ttl=60))
    assert (p.sub, p.scopes, p.topics) == ("bob", {"subscribe"}, ("room:*",))
    assert p.exp is not None and 50 <= p.exp - time.time() <= 61


@pytest.mark.parametrize("ttl", [None, 0, -60, 2**60, True])
def test_a_token_without_expiry_cannot_be_minted(ttl: Any) -> None:
    with pytest.raises(ValueError, match="ttl"):
        authority.mint("bob", ["subscribe"], ttl=ttl)


def test_a_minted_token_carries_iat_and_exp() -> None:
    token = authority.mint("bob", ["subscribe"], ttl=60)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert abs(claims["iat"] - time.time()) <= 2
    assert claims["exp"] - claims["iat"] == 60


def test_an_authority_refuses_a_secret_shorter_than_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        TokenAuthority("x" * 31)
    with pytest.raises(ValueError, match="32 bytes"):
        TokenAuthority("é" * 15)  # 30 bytes in UTF-8
    TokenAuthority("é" * 16)  # 32 bytes


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc", "abc"),
        ("BEARER  abc ", "abc"),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_takes_the_token_of_a_bearer_authorization_header(
    header: str | None, token: str | None
) -> None:
    assert bearer(header) == token


# -- subscribing -------------------------------------------------------------------------------


@pytest.mark.parametrize("topics", [None, ["room:*"], [], ["user:bob"]])
def test_a_user_may_always_subscribe_to_its_own_topic(topics: list[str] | None) -> None:
    p = principal("alice", topics=topics)
    assert p.may_subscribe("user:alice")
    p.check_subscribe(["user:alice"])


@pytest.mark.parametrize("topics", [None, ["room:*"], []])
def test_every_user_may_subscribe_to_broadcast(topics: list[str] | None) -> None:
    principal("alice", topics=topics).check_subscribe(["broadcast"])


@pytest.mark.parametrize("topics", [None, ["user:*"], ["*"], ["user:bob"], ["user:?ob"]])
def test_a_user_may_never_subscribe_to_another_users_topic(topics: list[str] | None) -> None:
    p = principal("alice", topics=topics)
    assert not p.may_subscribe("user:bob")
    with pytest.raises(Forbidden):
        p.check_subscribe(["user:bob"])


def test_another_users_topic_that_only_starts_like_ones_own_is_refused() -> None:
    p = principal("alice")
    assert not p.may_subscribe("user:alice2")
    assert not p.may_subscribe("user:alic")


def test_without_a_topics_claim_any_topic_may_be_subscribed() -> None:
    p = principal(topics=None)
    for topic in ("news", "room:1", "a.b.c", "x" * 128):
        assert p.may_subscribe(topic)


@pytest.mark.parametrize(
    ("patterns", "topic", "allowed"),
    [
        (["room:*"], "room:1", True),
        (["room:*"], "room:", True),
        (["room:*"], "news", False),
        (["room:*"], "Room:1", False),
        (["room:*", "news"], "news", True),
        (["news"], "news.eu", False),
        (["news.?"], "news.a", True),
        (["news.?"], "news.ab", False),
        (["room:[12]"], "room:2", True),
        (["room:[12]"], "room:3", False),
        ([], "news", False),
    ],
)
def test_the_topics_claim_is_a_list_of_glob_patterns(patterns: list[str], topic: str, allowed: bool) -> None:
    p = principal(topics=patterns)
    assert p.may_subscribe(topic) is allowed
    if allowed:
        p.check_subscribe([topic])
    else:
        with pytest.raises(Forbidden):
            p.check_subscribe([topic])


def test_one_topic_not_allowed_refuses_the_whole_subscription() -> None:
    with pytest.raises(Forbidden):
        principal(topics=["room:*"]).check_subscribe(["room:1", "news"])


def test_subscribing_needs_the_subscribe_scope_even_for_ones_own_topic() -> None:
    p = principal(scopes=("publish",))
    with pytest.raises(Forbidden, match="subscribe"):
        p.check_subscribe(["user:alice"])
    with pytest.raises(Forbidden, match="subscribe"):
        p.check_subscribe([])


def test_every_connection_gets_broadcast_and_its_own_user_topic_whatever_the_claim() -> None:
    assert set(principal("alice", topics=["room:*"]).auto_topics()) == {"broadcast", "user:alice"}
    assert set(principal("bob", topics=[]).auto_topics()) == {"broadcast", "user:bob"}


# -- publishing --------------------------------------------------------------------------------


def test_without_a_topics_claim_a_publisher_may_target_any_topic_user_topics_included() -> None:
    p = principal("backend", scopes=("publish",))
    for topic in ("news", "broadcast", "user:alice", "user:bob", "room:9"):
        assert p.may_publish(topic)
        p.check_publish(topic)


def test_a_user_topic_claim_lets_a_publisher_notify_users() -> None:
    p = principal("backend", scopes=("publish",), topics=["user:*"])
    p.check_publish("user:alice")
    with pytest.raises(Forbidden):
        p.check_publish("news")


@pytest.mark.parametrize("topic", ["news", "broadcast", "user:alice", "user:bob"])
def test_a_publisher_may_only_target_topics_its_claim_matches(topic: str) -> None:
    p = principal("alice", topics=["room:*"])
    assert not p.may_publish(topic)
    with pytest.raises(Forbidden):
        p.check_publish(topic)
    p.check_publish("room:7")


def test_publishing_needs_the_publish_scope() -> None:
    p = principal(scopes=("subscribe",))
    assert not p.may_publish("news")
    with pytest.raises(Forbidden, match="publish"):
        p.check_publish("news")


def test_scope_names_are_whole_words() -> None:
    p = authority.verify(raw_token({"sub": "alice", "scope": "subscribers publishing"}))
    assert not p.may_publish("news")
    with pytest.raises(Forbidden):
        p.check_subscribe(["news"])


def test_a_token_verified_before_is_refused_once_it_has_expired() -> None:
    authority = TokenAuthority(SECRET)
    # Expired already, but within the clock skew allowed: taken for 1.2 s more.
    token = mint_token(ttl=1.2 - LEEWAY)
    assert authority.verify(token).sub == "alice"  # verified once, then remembered

    def refused() -> bool:
        try:
            authority.verify(token)
        except AuthError:
            return True
        return False

    wait_until(refused, 5, "the remembered token to expire")
    with pytest.raises(AuthError, match="expired"):
        authority.verify(token)
