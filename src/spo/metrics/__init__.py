"""`evaluate` metric modules kept in the repository and loaded by path (never from the hub)."""
