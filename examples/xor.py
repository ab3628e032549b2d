"""The original project's XOR example, single process.

Layers (2, 2, 1), sigmoid, squared error, SGD with learning rate 0.5,
50 000 examples drawn from the four XOR rows, one example per step.

    python examples/xor.py [--seed N]

A (2, 2, 1) sigmoid network lands in the well-known XOR local minimum (two
rows stuck near 0.5) from roughly one in five Normal(0, 0.2) initializations,
whatever the engine; seed 0 converges.
"""

import argparse
import sys
import time

from dbnode.data import XOR_ROWS, XOR_TARGETS, xor
from dbnode.model import ModelSpec, init_params, predict
from dbnode.optim import make_optimizer
from dbnode.trainer import Trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    spec = ModelSpec(
        (2, 2, 1), activation="sigmoid", output="sigmoid", loss="squared_error", dtype="float64"
    )
    params = init_params(spec, "normal:0.2", seed=args.seed)
    x, y = xor(50_000, seed=args.seed)
    start = time.perf_counter()
    result = Trainer(spec, params, make_optimizer("sgd", 0.5)).fit(x, y, batch_size=1)
    seconds = time.perf_counter() - start
    out = predict(spec, params, XOR_ROWS)[:, 0]
    print(f"{result.examples} examples in {seconds:.2f} s ({result.examples / seconds:,.0f}/s)")
    for row, target, p in zip(XOR_ROWS, XOR_TARGETS, out):
        print(f"  {row.astype(int)} -> {p:.3f}  (target {target:.0f})")
    ok = bool(((out > 0.5) == (XOR_TARGETS > 0.5)).all())
    print("all four rows on the right side of 0.5" if ok else "stuck in the XOR local minimum")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
