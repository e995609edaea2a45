"""Writes data.csv, the example's own data: 600 noisy samples of a made-up nonlinear response of four inputs.

    python make_data.py        # data.csv is committed; this is how it was made (numpy, fixed seed)

y = sin(2 x1) + x2 * x3 - 0.5 x4^2 + noise, with x ~ N(0, 1) and noise ~ N(0, 0.1^2). A linear model explains
little of it, a small MLP most of it, and how well within a fixed step budget depends on the learning rate.
"""

from pathlib import Path

import numpy as np

ROWS, SEED, NOISE = 600, 7, 0.1


def make_data(rows: int = ROWS, seed: int = SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 4))
    y = np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] - 0.5 * x[:, 3] ** 2 + NOISE * rng.standard_normal(rows)
    return np.column_stack([x, y])


if __name__ == "__main__":
    path = Path(__file__).with_name("data.csv")
    np.savetxt(path, make_data(), fmt="%.4f", delimiter=",", header="x1,x2,x3,x4,y", comments="")
    print(f"wrote {path}")
