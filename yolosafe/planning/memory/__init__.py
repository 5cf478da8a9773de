"""planning.memory."""
