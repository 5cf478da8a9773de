"""The run directory's contract: file names, crash-safe writes, the lock, and the typed records (story, attempts,
failure records, events, the run spec), written and read through the same code by every process. Standard library
only.
"""
