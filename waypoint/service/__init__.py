"""Running as a service: the service manager's notify protocol (``notify``) and the health
and readiness checks of the metrics endpoint (``health``)."""
