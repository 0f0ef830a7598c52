"""Helpers of the multi-node loopback tests: a free port for a rendezvous, and the workers under a launcher."""
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


# The start of a worker script (`python -c`) that runs the real `xpsr infer` loop with a fake model: each image is
# a 0.3 s nearest-neighbour upscale, and every save is noted "start"/"written" by ``note(word, path)``, which the
# script defines before calling ``install_fake_infer(note)``. Claims and sharing are what the tests look at.
FAKE_INFER = """
import os, sys, time
import numpy as np
import xpsr.inference.run as run_mod
from xpsr.config import InferConfig, load_config
def install_fake_infer(note):
    def fake(modules, lr, content, quality, cfg, device):
        time.sleep(0.3)
        return np.repeat(np.repeat(lr, cfg.upscale, axis=0), cfg.upscale, axis=1)
    real_save = run_mod.save_png_atomic
    def save(array, path):
        note("start", path)
        real_save(array, path)
        note("written", path)
    run_mod.super_resolve, run_mod.save_png_atomic = fake, save
"""
