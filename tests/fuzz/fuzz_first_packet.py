"""atheris target: the first packet (``parse_first_packet`` and ``FirstPacketReader``).

Only ProtocolError (and its subclasses) may escape the parser. Properties checked:
the reader, fed in chunks, yields the same first event as ``parse_first_packet`` on
the same packet; a parsed StartupMessage or CancelRequest serialises back to the
exact bytes it came from; bytes after an ending packet stay buffered, untouched.

    python tests/fuzz/fuzz_first_packet.py -max_total_time=600 tests/fuzz/corpus/first_packet
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Chunks, fuzz, instrumentation

with instrumentation(__name__ == "__main__"):
    from waypoint.pgwire.errors import ProtocolError
    from waypoint.pgwire.startup import (
        CancelRequest,
        DirectTLS,
        FirstPacketReader,
        StartupMessage,
        build_cancel_request,
        build_startup_message,
        parse_first_packet,
    )


def _check_round_trip(event: object, packet: bytes) -> None:
    if isinstance(event, StartupMessage):
        rebuilt = build_startup_message(event.parameters, event.protocol)
        assert rebuilt == packet, "StartupMessage does not serialise back to its bytes"
    elif isinstance(event, CancelRequest):
        assert build_cancel_request(event.pid, event.secret) == packet


def test_one_input(data: bytes) -> None:
    chunks = Chunks(data)
    payload = chunks.payload
    try:
        whole = parse_first_packet(payload)
    except ProtocolError:
        whole = None
    else:
        if isinstance(whole, DirectTLS):
            assert whole.data == payload
        else:
            _check_round_trip(whole, payload)

    reader = FirstPacketReader()
    fed = 0
    events: list[object] = []
    try:
        for piece in chunks.split():
            reader.feed(piece)
            fed += len(piece)
            while not reader.finished and (event := reader.next_event()) is not None:
                events.append(event)
                if reader.finished:
                    break
            if reader.finished:
                break
    except ProtocolError:
        return
    if reader.finished:
        last = events[-1]
        assert isinstance(last, StartupMessage | CancelRequest | DirectTLS)
        if isinstance(last, DirectTLS):
            assert len(events) == 1
            assert last.data == payload[:fed]
        else:
            rest = reader.take_buffered()
            assert payload[:fed].endswith(rest)
    # A lone complete packet: the reader and the one-shot parser agree.
    if (
        whole is not None
        and len(events) == 1
        and reader.finished
        and not isinstance(whole, DirectTLS)
    ):
        assert events[0] == whole, (events[0], whole)


if __name__ == "__main__":
    fuzz(test_one_input)
