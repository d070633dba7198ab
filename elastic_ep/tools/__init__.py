"""Tools around the runtime: the ``elastic-ep`` command line, the container entry point,
the demo, the chaos harness, the invariants they check, and synthetic ranks."""
