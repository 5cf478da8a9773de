"""Read a run directory and the machine, never change a run: the memory report and plot, who holds GPU memory, and
``yolosafe doctor``. Run in the user's process; no torch.
"""
