"""Stateful properties of the pgwire readers (first packet, typed-message framing).

The per-call random-bytes properties live in test_pgwire_startup.py and
test_pgwire_framing.py; here a RuleBasedStateMachine drives each reader through
long interleavings of what a client or server may send (negotiation requests,
the ending packet, trailing bytes, malformed packets, large messages that cross
the compaction threshold, take_buffered at any point), delivered in arbitrary
pieces, and checks the reader against a simple model after every step.
"""

from __future__ import annotations

import struct
from collections import deque

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from waypoint.pgwire import (
    CancelRequest,
    FirstPacketReader,
    GSSENCRequest,
    Message,
    MessageReader,
    ProtocolError,
    SSLRequest,
    StartupMessage,
    build_cancel_request,
    build_gssenc_request,
    build_message,
    build_ssl_request,
    build_startup_message,
)
from waypoint.pgwire.startup import CANCEL_REQUEST_CODE, FirstPacket

name_st = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=12)
value_st = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=20)

# Packets a first-packet reader must refuse, each with the reason it is malformed.
BAD_FIRST_PACKETS = st.sampled_from(
    [
        struct.pack("!I", 7) + b"\0\0\0\0",  # length below 8
        struct.pack("!I", 10005) + b"\0\0\0\0",  # length above 10004
        struct.pack("!I", 0xFFFFFFFF) + b"\0\0\0\0",
        struct.pack("!II", 9, (1234 << 16) | 5679) + b"x",  # SSLRequest of 9 bytes
        struct.pack("!II", 15, CANCEL_REQUEST_CODE) + b"\0\0\0",  # cancel key of 3 bytes
        struct.pack("!II", 8, (1234 << 16) | 9999),  # unknown request code
        struct.pack("!II", 10, 2 << 16) + b"\0\0",  # protocol 2.0
        struct.pack("!II", 12, 3 << 16) + b"u\0v\0",  # no final terminator
        struct.pack("!II", 11, 3 << 16) + b"\xff\0\0",  # name not UTF-8
        struct.pack("!II", 16, 3 << 16)
        + b"a\0b\0a\0c\0",  # duplicate parameter (no terminator either)
    ]
)


class FirstPacketReaderMachine(RuleBasedStateMachine):
    """A client sends negotiation requests, then one ending packet, then anything;
    the bytes arrive in arbitrary pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.reader = FirstPacketReader()
        self.pending = bytearray()  # sent, not yet delivered
        self.delivered = 0
        self.consumed = 0  # bytes of packets the reader returned
        self.expected: deque[tuple[FirstPacket, int]] = deque()
        self.ended = False  # the model sent an ending packet
        self.bad_from: int | None = None  # stream offset of a malformed packet
        self.failed = False
        self.sent = 0
        self.stream = bytearray()  # every delivered byte

    def _send(self, data: bytes, event: FirstPacket | None) -> None:
        if event is not None:
            self.expected.append((event, len(data)))
        self.pending += data
        self.sent += len(data)

    @precondition(lambda self: not self.ended and self.bad_from is None)
    @rule(kind=st.sampled_from(["ssl", "gss"]))
    def send_negotiation(self, kind: str) -> None:
        if kind == "ssl":
            self._send(build_ssl_request(), SSLRequest())
        else:
            self._send(build_gssenc_request(), GSSENCRequest())

    @precondition(lambda self: not self.ended and self.bad_from is None)
    @rule(params=st.dictionaries(name_st, value_st, max_size=6), minor=st.integers(0, 2))
    def send_startup(self, params: dict[str, str], minor: int) -> None:
        self._send(build_startup_message(params, (3, minor)), StartupMessage((3, minor), params))
        self.ended = True

    @precondition(lambda self: not self.ended and self.bad_from is None)
    @rule(pid=st.integers(-(2**31), 2**31 - 1), secret=st.binary(min_size=4, max_size=256))
    def send_cancel(self, pid: int, secret: bytes) -> None:
        self._send(build_cancel_request(pid, secret), CancelRequest(pid, secret))
        self.ended = True

    @precondition(lambda self: not self.ended and self.bad_from is None)
    @rule(packet=BAD_FIRST_PACKETS)
    def send_malformed(self, packet: bytes) -> None:
        self.bad_from = self.sent
        self._send(packet, None)

    @precondition(lambda self: self.ended or self.bad_from is not None)
    @rule(data=st.binary(min_size=1, max_size=40))
    def send_trailing(self, data: bytes) -> None:
        self._send(data, None)

    @precondition(lambda self: bool(self.pending) and not self.reader.finished and not self.failed)
    @rule(size=st.integers(1, 64))
    def deliver(self, size: int) -> None:
        piece = bytes(self.pending[:size])
        del self.pending[:size]
        self.reader.feed(piece)
        self.stream += piece
        self.delivered += len(piece)
        while not self.reader.finished:
            try:
                event = self.reader.next_event()
            except ProtocolError:
                assert self.bad_from is not None, "a well-formed stream was refused"
                assert not self.expected, "refused before the packets ahead of the bad one"
                assert self.consumed == self.bad_from
                self.failed = True
                return
            if event is None:
                break
            assert self.expected, f"unexpected event {event!r}"
            want, length = self.expected.popleft()
            assert event == want
            self.consumed += length
        if self.reader.finished:
            # The ending packet was the last expected event; what follows it is the caller's.
            assert not self.expected
            assert self.reader.take_buffered() == bytes(self.stream[self.consumed :])
            self.consumed = self.delivered

    @invariant()
    def buffered_is_what_was_delivered_and_not_consumed(self) -> None:
        if not self.reader.finished and not self.failed:
            assert self.reader.buffered == self.delivered - self.consumed

    @invariant()
    def complete_packets_never_wait(self) -> None:
        # Every packet fully delivered before the malformed one has been returned.
        if self.failed or self.reader.finished or not self.expected:
            return
        _, length = self.expected[0]
        assert self.delivered - self.consumed < length


class MessageReaderMachine(RuleBasedStateMachine):
    """A peer sends typed messages of up to ~100 KiB (crossing the 64 KiB compaction
    threshold); the bytes arrive in arbitrary pieces; the caller may take the
    buffered bytes at any point (and then the stream restarts at a message)."""

    LIMIT = 120_000

    def __init__(self) -> None:
        super().__init__()
        self.reader = MessageReader(max_message_size=self.LIMIT)
        self.pending = bytearray()
        self.expected: deque[Message] = deque()
        self.in_reader = 0  # bytes delivered and not returned
        self.failed = False

    @precondition(lambda self: not self.failed)
    @rule(
        type_=st.binary(min_size=1, max_size=1),
        size=st.one_of(st.integers(0, 64), st.integers(60_000, 100_000)),
        fill=st.integers(0, 255),
    )
    def send_message(self, type_: bytes, size: int, fill: int) -> None:
        msg = Message(type_, bytes([fill]) * size)
        self.pending += msg.raw
        self.expected.append(msg)

    @precondition(lambda self: bool(self.pending) and not self.failed)
    @rule(size=st.one_of(st.integers(1, 16), st.integers(1, 70_000)))
    def deliver(self, size: int) -> None:
        piece = bytes(self.pending[:size])
        del self.pending[:size]
        self.reader.feed(piece)
        self.in_reader += len(piece)
        while (msg := self.reader.next_message()) is not None:
            want = self.expected.popleft()
            assert msg == want
            self.in_reader -= len(want.raw)

    @precondition(lambda self: not self.failed and not self.pending)
    @rule(length=st.one_of(st.integers(0, 3), st.integers(120_001, 2**32 - 1)))
    def deliver_bad_header(self, length: int) -> None:
        self.reader.feed(b"X" + struct.pack("!I", length))
        try:
            msg = self.reader.next_message()
        except ProtocolError:
            self.failed = True
            return
        raise AssertionError(f"length {length} accepted: {msg!r}")

    @precondition(lambda self: self.failed)
    @rule()
    def refused_stream_stays_refused(self) -> None:
        try:
            self.reader.next_message()
        except ProtocolError:
            return
        raise AssertionError("a refused header was accepted on the next call")

    @precondition(lambda self: not self.failed)
    @rule()
    def take_buffered(self) -> None:
        taken = self.reader.take_buffered()
        assert len(taken) == self.in_reader
        if self.expected and taken:
            assert self.expected[0].raw.startswith(taken)
        # The peer starts over with the message that was cut.
        if taken:
            self.pending[:0] = taken
        self.in_reader = 0

    @invariant()
    def buffered_matches_model(self) -> None:
        if not self.failed:
            assert self.reader.buffered == self.in_reader
            assert self.in_reader <= 5 + self.LIMIT


# A first-packet exchange is short (a few negotiations, one ending packet, some trailing
# bytes); the framing machine needs more steps to interleave large messages.
TestFirstPacketReaderStateful = FirstPacketReaderMachine.TestCase
TestFirstPacketReaderStateful.settings = settings(settings.default, stateful_step_count=15)
TestMessageReaderStateful = MessageReaderMachine.TestCase
TestMessageReaderStateful.settings = settings(settings.default, stateful_step_count=25)


def test_build_message_helper_matches_message_raw() -> None:
    # The machines above build streams with Message.raw; it must be the wire form.
    assert Message(b"Q", b"x").raw == build_message(b"Q", b"x") == b"Q\0\0\0\x05x"
