"""Statement audit: which person ran which statement.

* :mod:`waypoint.audit.tracker` — sans I/O: reads the relayed bytes of one session (both
  directions), records every frontend message that runs SQL, and pairs the backend's
  answers with them (CommandComplete tag, SQLSTATE, duration).
* :mod:`waypoint.audit.sink` — the writer: a bounded queue between the relay and a thread
  writing JSON Lines (a file with size-based rotation, or standard output), each record
  carrying the SHA-256 of the one before it.
* :mod:`waypoint.audit.chain` — reading the files back: ``verify`` (the hash chain) and
  ``search``.
"""
