"""atheris target: typed-message framing (``MessageReader``) and the backend
message parser behind it (``parse_backend_message``).

Only ProtocolError may escape. Properties: chunked feeding yields messages whose
wire form, concatenated with what stays buffered, is exactly the input; a length
word above the reader's bound is refused before its body is buffered.

    python tests/fuzz/fuzz_framing.py -max_total_time=600 tests/fuzz/corpus/framing
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contextlib

from _harness import Chunks, fuzz, instrumentation

with instrumentation(__name__ == "__main__"):
    from waypoint.pgwire.errors import ProtocolError
    from waypoint.pgwire.framing import MessageReader
    from waypoint.pgwire.messages import parse_backend_message

# Small enough for the fuzzer to cross it; the control byte's low bit picks it.
_SMALL_LIMIT = 64


def test_one_input(data: bytes) -> None:
    chunks = Chunks(data)
    limit = _SMALL_LIMIT if chunks.control & 1 else 1 << 20
    reader = MessageReader(max_message_size=limit)
    out = bytearray()
    fed = 0
    try:
        for piece in chunks.split():
            reader.feed(piece)
            fed += len(piece)
            while (msg := reader.next_message()) is not None:
                assert 4 <= len(msg.body) + 4 <= limit
                out += msg.raw
                with contextlib.suppress(ProtocolError):
                    parse_backend_message(msg)
            # Never more than one partial message (header + bounded body) buffered.
            assert reader.buffered <= 5 + limit
    except ProtocolError:
        # Refused at a header: what was returned before is still a prefix of the input.
        assert chunks.payload.startswith(bytes(out))
        return
    assert bytes(out) + reader.take_buffered() == chunks.payload[:fed]
    assert fed == len(chunks.payload)


if __name__ == "__main__":
    fuzz(test_one_input)
