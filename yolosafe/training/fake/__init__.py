"""Fake GPUs only: the changes that run Ultralytics' DDP path as CPU ranks over gloo, and the phase files the fake NVML
backend follows. Registered only when the run spec says fake GPUs.
"""
