"""The console: a virtual database each listener answers itself (``console_database``), for
callers whose grant carries ``"console"``: live sessions, KILL, LOCK LOGIN."""
