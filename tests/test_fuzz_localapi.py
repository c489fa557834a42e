"""The LocalAPI client's pure parsers as untrusted input: whatever tailscaled (or
something impersonating its socket) answers, the outcome is a value or the module's
own IdentityError subclass, never another exception.

The whois JSON → Identity path is covered by test_identity_whois_parsing.py and
test_fuzz_grants.py; here: the JSON decoding, the Retry-After header, the PEM pair
split, and the whois address formatting.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.identity.localapi import (
    BadAddress,
    MalformedResponse,
    _parse_retry_after,
    decode_json_object,
    format_whois_addr,
    split_pem_pair,
)


@given(body=st.binary(max_size=300))
def test_arbitrary_answer_bytes_decode_to_an_object_or_malformed(body: bytes) -> None:
    try:
        value = decode_json_object(body, "test")
    except MalformedResponse:
        return
    assert isinstance(value, dict)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON decoder's recursion
        b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
        b"1" * 5000,  # above int()'s digit limit
        b'{"x": NaN}',
        b'{"x": Infinity}',
        b"\xff\xfe{}",
    ],
)
def test_hostile_json_answers_are_malformed_responses(body: bytes) -> None:
    with pytest.raises(MalformedResponse):
        decode_json_object(body, "test")


http_dates = st.builds(
    lambda day, mon, year, hh, mm, ss, zone: (
        f"Wed, {day} {mon} {year} {hh}:{mm}:{ss} {zone}".encode()
    ),
    st.integers(-1, 40),
    st.sampled_from(["Jan", "Oct", "Foo"]),
    st.integers(-10, 10**15),
    st.integers(0, 99),
    st.integers(0, 99),
    st.integers(0, 99),
    st.sampled_from(["GMT", "-0000", "+2359", "-9999", "UT", "XYZ"]),
)


@given(value=st.none() | st.binary(max_size=40) | http_dates)
def test_any_retry_after_header_gives_a_delay_or_none(value: bytes | None) -> None:
    delay = _parse_retry_after(value)
    assert delay is None or (delay >= 0 and math.isfinite(delay))


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"120", 120.0),
        (b" 7 ", 7.0),
        (b"\xb2", None),  # "²": str.isdigit() is true, int() refused it (ValueError)
        (b"\xb9\xb2\xb3", None),
        (b"9" * 400, None),  # float(int(...)) overflowed (OverflowError)
        (b"9" * 5000, None),  # int() refused over 4300 digits (ValueError)
        (b"Wed, 21 Oct 99999999999 07:28:00 GMT", None),  # OverflowError in the date parser
        (b"Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
        (b"soon", None),
    ],
)
def test_retry_after_regressions(header: bytes, expected: float | None) -> None:
    assert _parse_retry_after(header) == expected


_KEY = b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"
_CERT = b"-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n"
pem_piece = st.sampled_from(
    [
        _KEY,
        _CERT,
        b"-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
        b"-----BEGIN FOO-----\nAA\n-----END FOO-----\n",
        b"-----BEGIN CERTIFICATE-----\nMIIC\n",  # unterminated
        b"-----END CERTIFICATE-----\n",
        b"garbage\n",
        b"\r\n",
    ]
)


@given(pieces=st.lists(st.one_of(pem_piece, st.binary(max_size=30)), max_size=6))
def test_any_certificate_pair_answer_splits_or_is_malformed_without_quoting_it(
    pieces: list[bytes],
) -> None:
    body = b"".join(pieces)
    try:
        key, chain = split_pem_pair(body)
    except MalformedResponse as exc:
        assert b"MIIB" not in str(exc).encode()  # the key material is never quoted
        return
    assert b"PRIVATE KEY-----" in key and key in body
    assert chain.count(b"-----BEGIN CERTIFICATE-----") >= 1


@given(host=st.text(max_size=50), port=st.integers(-5, 70_000))
def test_any_peer_address_formats_or_is_a_bad_address(host: str, port: int) -> None:
    try:
        addr = format_whois_addr(host, port)
    except BadAddress:
        return
    assert isinstance(addr, str) and addr.endswith(f":{port}")
    assert 0 < port < 65536


def test_decoded_answers_keep_unicode_and_big_numbers() -> None:
    doc = {"UserProfile": {"LoginName": "zoë@例え.jp"}, "n": 2**70}
    assert decode_json_object(json.dumps(doc).encode(), "test") == doc
