"""readers.doctor."""
