"""``waypoint demo``: a throwaway PostgreSQL, sample databases, and the walkthrough text."""

from waypoint.demo.cluster import DemoCluster, DemoError, PostgresChoice, find_postgres

__all__ = ["DemoCluster", "DemoError", "PostgresChoice", "find_postgres"]
