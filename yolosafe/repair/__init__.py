"""``yolosafe fix``: the only code that writes users' files (their config, their shell rc), each change asked first,
backed up, written atomically; and the only code that may stop a process, one proven stale.
"""
