"""The ``yolosafe`` command line (click): one line and exit status 2 for bad input, nothing else of its own.

Runs in the user's process; imports the library, and nothing imports it. No torch.
"""
