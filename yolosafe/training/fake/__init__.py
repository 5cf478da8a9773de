"""training.fake."""
