"""The parent process of a run (``yolosafe train``): the attempt loop, the retry policy, process control of the child,
the rank launch command, the memory watch and whose memory it sees, the terminal, and the agreement between nodes.
Never imports torch; its only interface with the training processes is the run spec and the environment.
"""
