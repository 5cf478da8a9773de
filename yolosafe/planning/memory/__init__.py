"""The memory plan: the model of a GPU's train and validation peaks, ``--gpus auto``/``--batch auto``, this machine's
history and host RAM. Pure; the fake-tensor pass it may need runs in a child (:mod:`yolosafe.training.fakepass`).
"""
