"""A researcher's own federated data: 8x8 stroke images drawn by 12 writers, each with a hand of their own.

``make_data()`` returns ``(x, y, groups)``: x [n, 1, 8, 8] floats in [0, 1], y the stroke class (0 horizontal,
1 vertical, 2 diagonal), groups the writer id. Each writer draws every stroke shifted by their own offset and
with their own ink level, so ``partition: natural`` (one client per writer or more) gives clients whose
inputs differ the way handwriting does (feature skew), while their labels stay balanced.
"""

import numpy as np

WRITERS = 12
SAMPLES_PER_WRITER = 30
SIZE = 8


def stroke(kind: int, offset: int) -> np.ndarray:
    image = np.zeros((SIZE, SIZE), dtype=np.float32)
    line = (SIZE // 2 + offset) % SIZE
    if kind == 0:
        image[line, :] = 1.0
    elif kind == 1:
        image[:, line] = 1.0
    else:
        np.fill_diagonal(image, 1.0)
        image = np.roll(image, offset, axis=1)
    return image


def make_data():
    rng = np.random.default_rng(0)
    xs, ys, writers = [], [], []
    for writer in range(WRITERS):
        offset, ink = int(rng.integers(-2, 3)), float(rng.uniform(0.5, 1.0))
        for _ in range(SAMPLES_PER_WRITER):
            kind = int(rng.integers(0, 3))
            noise = rng.normal(0.0, 0.15, size=(SIZE, SIZE))
            xs.append(np.clip(ink * stroke(kind, offset) + noise, 0.0, 1.0)[None])
            ys.append(kind)
            writers.append(writer)
    return np.stack(xs).astype(np.float32), np.array(ys), np.array(writers)
