"""yolosafe as a library: the train flow the CLI and Python callers share."""
