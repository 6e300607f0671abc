"""Small CPU linear algebra on one thread.

Two reasons: speed (a QR or a product of 128×128 matrices is microseconds of work, and
handing it to a pool of threads costs more: on the 16-core GPU host a 127×127 QR took 11 ms
with all threads, results/kernels/NOTES.md, session 9), and reproducibility (LAPACK's QR
gives bitwise different results for different thread counts, so a rotation fitted on a
machine with 2 threads would differ from one fitted with 16).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
