"""What a run will be, decided before anything starts: options and their defaults, the train plan (split, ``nbs``,
validation batch), accumulation, allocator settings, nodes, datasets, input checks and the memory plan.

Pure: runs in whichever process asks (the CLI, the API, readers); no torch, no click, no process of its own.
"""
