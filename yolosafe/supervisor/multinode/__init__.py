"""Several machines: who is in the run (``cluster``), the shared run directory and its command line (``setup``), and
the recovery every node derives from every node's end record (``agree``).
"""
