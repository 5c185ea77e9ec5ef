"""Child process for test_store_crash: hammers a VoiceStore from 3 threads until SIGKILLed."""

from __future__ import annotations

import os
import random
import sys
import threading

import numpy as np

from csm_voice_api.errors import VoiceNotFound
from csm_voice_api.voices import VoiceStore


def hammer(store: VoiceStore, t: int, seed: int) -> None:
    rng = random.Random(seed * 100 + t)
    mine: list[str] = []
    n = 0
    while True:
        n += 1
        pcm = np.random.default_rng(n).uniform(-0.5, 0.5, 2400).astype(np.float32)
        codes = np.random.default_rng(n).integers(0, 2048, size=(8, 4))
        mine.append(store.create(f"p{os.getpid()}-t{t}-{n}", pcm, transcript="hi", codes=codes).id)
        try:
            if rng.random() < 0.3:
                store.delete(mine.pop(rng.randrange(len(mine))))
            if mine and rng.random() < 0.3:
                store.set_codes(rng.choice(mine), codes[:, :2] if rng.random() < 0.8 else None)
        except VoiceNotFound:
            pass


def main() -> None:
    store = VoiceStore(sys.argv[1])
    seed = int(sys.argv[2])
    for t in range(3):
        threading.Thread(target=hammer, args=(store, t, seed), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
