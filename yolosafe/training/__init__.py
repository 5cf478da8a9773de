"""The processes that train: the worker (one process, or one DDP rank), the rank launcher, yolosafe's trainer and
callbacks, failure records as a rank dies, ``compat`` (the private Ultralytics details relied on) and the fake-tensor
memory pass. The only place torch and Ultralytics are imported.
"""
