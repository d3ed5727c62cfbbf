"""Wire formats: topic names, client frames, ``since`` values, notification frames and broker envelopes."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from notifier.protocol import (
    Accepted,
    BadFrame,
    Notification,
    parse_client_frame,
    parse_since,
    topic_list,
    valid_topic,
)

CONTRACT_TOPIC = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


# -- topic names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["a", "news", "room:42", "user:alice", "orders.eu-west_1", "A:b.c_d-e", "x" * 128, "0", "::"],
)
def test_topic_names_of_the_contract_alphabet_up_to_128_chars_are_valid(topic: str) -> None:
    assert valid_topic(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "x" * 129,
        "has space",
        "slash/topic",
        "star*",
        "comma,topic",
        "ümlaut",
        "news\n",
        "\nnews",
        "tab\t",
        "null\x00byte",
    ],
)
def test_topic_names_outside_the_contract_alphabet_are_invalid(topic: str) -> None:
    assert not valid_topic(topic)


@pytest.mark.parametrize("topic", [None, 42, ["news"], {"topic": "news"}, b"news"])
def test_non_string_topics_are_invalid(topic: object) -> None:
    assert not valid_topic(topic)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=140))
def test_topic_validity_is_exactly_the_contract_pattern(topic: str) -> None:
    assert valid_topic(topic) == (CONTRACT_TOPIC.fullmatch(topic) is not None)


def test_topic_list_keeps_order_and_drops_duplicates() -> None:
    assert topic_list(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]


@pytest.mark.parametrize("value", [None, "news", [], ["news", "bad topic"], ["news", 3], {"news": 1}])
def test_topic_list_rejects_anything_but_a_non_empty_list_of_valid_names(value: object) -> None:
    with pytest.raises(BadFrame):
        topic_list(value)


# -- client frames -----------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["r-1", "", 7, 0, -3, 1.5])
def test_a_string_or_number_ref_is_echoed_unchanged(ref: str | int | float) -> None:
    frame = parse_client_frame(json.dumps({"type": "ping", "ref": ref}))
    reply = frame.reply({"type": "pong"})
    assert reply == {"type": "pong", "ref": ref}
    assert type(reply["ref"]) is type(ref)


@pytest.mark.parametrize("ref", [True, False, None, {"id": 1}, [1, 2]])
def test_a_ref_that_is_not_a_string_or_number_is_not_echoed(ref: object) -> None:
    frame = parse_client_frame(json.dumps({"type": "ping", "ref": ref}))
    assert frame.reply({"type": "pong"}) == {"type": "pong"}


def test_a_frame_without_ref_gets_a_reply_without_ref() -> None:
    frame = parse_client_frame('{"type": "ping"}')
    assert frame.reply({"type": "pong"}) == {"type": "pong"}


def test_a_frame_keeps_its_type_and_fields() -> None:
    frame = parse_client_frame('{"type": "subscribe", "topics": ["news"], "since": "12", "ref": "s"}')
    assert frame.type == "subscribe"
    assert frame.body["topics"] == ["news"]
    assert frame.body["since"] == "12"


@pytest.mark.parametrize("raw", ["", "not json", "{", '{"type": "ping",}', "{'type': 'ping'}", "\x00"])
def test_text_that_is_not_json_is_a_bad_frame(raw: str) -> None:
    with pytest.raises(BadFrame):
        parse_client_frame(raw)


@pytest.mark.parametrize("raw", ["[]", '["ping"]', '"ping"', "42", "null", "true"])
def test_json_that_is_not_an_object_is_a_bad_frame(raw: str) -> None:
    with pytest.raises(BadFrame):
        parse_client_frame(raw)


@pytest.mark.parametrize("raw", ['{"ref": 1}', '{"type": 5, "ref": 1}', '{"type": null, "ref": 1}'])
def test_a_frame_without_a_string_type_still_echoes_its_ref(raw: str) -> None:
    # Such a frame is answered with a bad_request error, which must carry the ref.
    frame = parse_client_frame(raw)
    assert frame.type not in ("subscribe", "unsubscribe", "publish", "ping", "refresh")
    assert frame.reply({"type": "error"}) == {"type": "error", "ref": 1}


# -- since -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"), [("0", 0), ("1", 1), ("42", 42), ("18446744073709551615", 2**64 - 1)]
)
def test_since_is_a_decimal_notification_id_or_0_for_everything_retained(raw: str, expected: int) -> None:
    assert parse_since(raw) == expected


def test_absent_since_means_no_recovery() -> None:
    assert parse_since(None) is None


@pytest.mark.parametrize(
    "raw", ["", "abc", "-1", "-0", "+1", "+0", "1.5", "0.0", "1e3", " 1", "1 ", "0x10", "١٢", "1" * 21]
)
def test_malformed_since_is_rejected(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_since(raw)


# -- notification frames and envelopes ---------------------------------------------------------


def _frame(id_: int, topic: str, data: Any, ts: int) -> Notification:
    return Notification.build(id_, topic, json.dumps(data, ensure_ascii=False).encode(), ts)


def test_a_notification_frame_is_the_contract_json_object() -> None:
    n = _frame(17, "room:1", {"text": "hi", "n": [1, None]}, 1_700_000_000_123)
    assert json.loads(n.frame) == {
        "type": "notification",
        "id": "17",
        "topic": "room:1",
        "data": {"text": "hi", "n": [1, None]},
        "ts": 1_700_000_000_123,
    }
    assert (n.id, n.topic, n.ts) == (17, "room:1", 1_700_000_000_123)


def test_a_notification_frame_size_counts_utf8_bytes() -> None:
    n = _frame(1, "news", {"text": "héllo wörld 😀"}, 1)
    assert n.size == len(n.frame.encode("utf-8"))
    assert n.size > len(n.frame)


def test_null_data_is_kept_as_null() -> None:
    n = _frame(3, "news", None, 5)
    assert json.loads(n.frame)["data"] is None


@given(
    id_=st.integers(1, 2**63),
    topic=st.from_regex(CONTRACT_TOPIC, fullmatch=True),
    data=json_values,
    ts=st.integers(0, 2**45),
)
def test_a_notification_survives_the_broker_envelope_round_trip(
    id_: int, topic: str, data: Any, ts: int
) -> None:
    n = _frame(id_, topic, data, ts)
    back = Notification.from_envelope(topic, n.envelope())
    assert back == n
    expected = {"type": "notification", "id": str(id_), "topic": topic, "data": data, "ts": ts}
    assert json.loads(back.frame) == expected


def test_an_accepted_publish_answers_with_a_string_id() -> None:
    assert Accepted(12, "news", 99).as_json() == {"id": "12", "topic": "news", "ts": 99}
