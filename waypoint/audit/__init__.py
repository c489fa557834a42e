"""Statement audit: which person ran which statement.

* :mod:`waypoint.audit.tracker` — sans I/O, the reference: reads the relayed bytes of one
  session (both directions), records every frontend message that runs SQL, and pairs the
  backend's answers with them (CommandComplete tag, SQLSTATE, duration). Sessions run its
  twin in C (waypoint/proxy/relay/_audit.h, ``session.session_tracker``), which the relay
  engine feeds without the GIL and which gives the same records, encoded. It reads the wire
  through :mod:`waypoint.audit.messages` and keeps a session's names in
  :mod:`waypoint.audit.names`.
* :mod:`waypoint.audit.sink` — the writer: a bounded queue between the relay and a thread
  writing JSON Lines (a file with size-based rotation, or standard output), each record
  carrying the SHA-256 of the one before it (chained in C).
* :mod:`waypoint.audit.chain` — reading the files back: ``verify`` (the hash chain) and
  ``search``.
"""
