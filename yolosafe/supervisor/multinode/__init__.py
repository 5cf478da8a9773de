"""supervisor.multinode."""
