"""The codec and the task envelope, as pure logic (no Redis): what can travel, and how it fails.

D05's "SerializationError before anything is written" rests on these: the client encodes
the whole task before its first Redis call.
"""

from __future__ import annotations

import datetime
import decimal
from typing import Any

import msgpack
import pytest

from sessionq import ActivityOptions, Codec, ConfigurationError, RetryPolicy, SerializationError
from sessionq.codec import DEFAULT_MAX_PAYLOAD_SIZE
from sessionq.envelope import Result, decode_result, decode_task, encode_result, encode_task

ROUND_TRIP: list[Any] = [
    b"",
    b"\x00\xff" * 10,
    "",
    "h\u00e9llo \U0001f600",
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    1.5,
    float("inf"),
    True,
    False,
    None,
    [],
    {},
    [1, [2, [3, [4]]]],
    {"nested": {"list": [b"x", None, 2.5], "empty": {}}},
    {1: "int keys survive", 2: None},
]


@pytest.mark.parametrize("value", ROUND_TRIP, ids=repr)
def test_basic_values_round_trip_with_their_types(value: Any) -> None:
    codec = Codec()
    back = codec.loads(codec.dumps(value))
    assert back == value
    assert type(back) is type(value)


def test_sets_and_tuples_become_lists() -> None:
    codec = Codec()
    assert codec.loads(codec.dumps((1, (2, 3)))) == [1, [2, 3]]
    assert sorted(codec.loads(codec.dumps({3, 1, 2}))) == [1, 2, 3]
    assert sorted(codec.loads(codec.dumps(frozenset({"a", "b"})))) == ["a", "b"]


@pytest.mark.parametrize(
    "value",
    [object(), [1, {"deep": object()}], datetime.datetime(2024, 1, 1), decimal.Decimal("1.5"), 2**64],
    ids=["object", "nested-object", "datetime", "decimal", "int-too-big"],
)
def test_unencodable_values_raise_serialization_error_naming_the_value(value: Any) -> None:
    with pytest.raises(SerializationError, match="argument 1 of 'f'"):
        Codec().dumps(value, what="argument 1 of 'f'")


def test_payload_size_limit() -> None:
    codec = Codec(max_payload_size=100)
    assert codec.dumps(b"x" * 90)  # 2-byte header + 90 bytes: fits
    with pytest.raises(SerializationError, match="over the 100-byte limit"):
        codec.dumps(b"x" * 100)
    assert Codec().max_payload_size == DEFAULT_MAX_PAYLOAD_SIZE == 1024 * 1024
    with pytest.raises(SerializationError):
        Codec().dumps(b"x" * DEFAULT_MAX_PAYLOAD_SIZE)


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "10"])
def test_invalid_max_payload_size_is_a_configuration_error(size: Any) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Codec(max_payload_size=size)
    assert caught.value.field == "max_payload_size"


def test_registered_types_round_trip_and_untaught_codecs_refuse_them() -> None:
    codec = Codec()
    codec.register(
        datetime.date, 1, lambda d: d.isoformat().encode(), lambda b: datetime.date.fromisoformat(b.decode())
    )
    data = codec.dumps({"when": datetime.date(2024, 2, 29)})
    assert codec.loads(data) == {"when": datetime.date(2024, 2, 29)}
    with pytest.raises(SerializationError, match="extension type 1"):
        Codec().loads(data)


def test_register_rejects_bad_or_duplicate_codes() -> None:
    codec = Codec()
    with pytest.raises(ConfigurationError):
        codec.register(int, 128, bytes, int)
    codec.register(complex, 5, lambda c: repr(c).encode(), lambda b: complex(b.decode()))
    with pytest.raises(ConfigurationError):
        codec.register(decimal.Decimal, 5, lambda d: str(d).encode(), lambda b: decimal.Decimal(b.decode()))


def test_codecs_do_not_share_registrations() -> None:
    taught = Codec()
    taught.register(decimal.Decimal, 3, lambda d: str(d).encode(), lambda b: decimal.Decimal(b.decode()))
    with pytest.raises(SerializationError):
        Codec().dumps(decimal.Decimal("2"))


def test_garbage_does_not_decode() -> None:
    with pytest.raises(Exception):  # noqa: B017 - any error: the worker moves the entry aside (D04)
        Codec().loads(b"\xc1garbage")


# --- the task envelope ------------------------------------------------------------------


def make_task(codec: Codec, *args: Any, **kwargs: Any) -> bytes:
    return encode_task(
        codec,
        activity_id="a1",
        name="process",
        args=args,
        kwargs=kwargs,
        client_id="c1",
        session_id=None,
        options=ActivityOptions(
            start_to_close_timeout=5,
            heartbeat_timeout=2,
            retry_policy=RetryPolicy(maximum_attempts=4, non_retryable_error_types=["KeyError"]),
        ),
    )


def test_task_round_trips_through_the_envelope() -> None:
    codec = Codec()
    task = decode_task(codec, make_task(codec, "a.txt", 3, flag=True), b"1700000000123-0")
    assert (task.activity_id, task.name, task.args, task.kwargs) == (
        "a1",
        "process",
        ["a.txt", 3],
        {"flag": True},
    )
    assert (task.attempt, task.client_id, task.session_id) == (1, "c1", None)
    assert (task.start_to_close, task.heartbeat_timeout, task.schedule_to_close) == (5.0, 2.0, None)
    assert task.retry_policy is not None
    assert task.retry_policy.maximum_attempts == 4
    assert task.retry_policy.non_retryable_error_types == ("KeyError",)
    assert task.enqueued_ms == 1700000000123


def test_unencodable_argument_fails_while_encoding_the_task() -> None:
    with pytest.raises(SerializationError, match="'process'"):
        make_task(Codec(), object())
    with pytest.raises(SerializationError, match="'process'"):
        make_task(Codec(), x=object())
    with pytest.raises(SerializationError, match="limit"):
        make_task(Codec(max_payload_size=200), "y" * 200)


ARGS_NOT_A_LIST = {"i": "x", "n": "f", "a": 1, "k": {}, "t": 1, "c": "c", "s": None, "o": [None] * 5}


@pytest.mark.parametrize(
    "payload",
    [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"i": "x"}), msgpack.packb(ARGS_NOT_A_LIST)],
    ids=["not-msgpack", "not-a-map", "missing-fields", "args-not-a-list"],
)
def test_malformed_task_payloads_raise(payload: bytes) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        decode_task(Codec(), payload, b"1-0")


def test_unencodable_result_becomes_a_serialization_error_message() -> None:
    codec = Codec()
    message = decode_result(codec, encode_result(codec, "a1", object(), "process"))
    assert isinstance(message, Result)
    assert message.error is not None
    assert message.error.kind == "SerializationError"
    assert "the result of activity 'process'" in message.error.message
    ok = decode_result(codec, encode_result(codec, "a2", {"v": [1]}, "process"))
    assert isinstance(ok, Result) and ok.error is None and ok.value == {"v": [1]}
