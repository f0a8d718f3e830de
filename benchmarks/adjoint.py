"""Memory and time of memory-free backpropagation against exact backprop, checkpointing and torchdiffeq.

One gradient step (forward + backward) of a fully connected Euler ResNet (perceptron residual, q = 16,
m = 32, tanh, 256 inputs, float32) at depth 1000, every method timed in the same run on the same
inputs. Memory is the bytes autograd keeps for the backward pass (resnode.adjoint.saved_tensor_bytes).

    python benchmarks/adjoint.py            # the measurement; writes benchmarks/results.json
    python benchmarks/adjoint.py --smoke    # seconds, for the test suite; writes nothing unless --out
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

import resnode
from resnode import adjoint, init, models


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), {platform.system()}, torch {torch.__version__}"


def measure(depth: int, repeats: int, seed: int = 0) -> list[dict]:
    perceptron = models.Perceptron(dim=16, width=32, activation="tanh")
    weights = init.init_weights("smooth", depth, perceptron.shapes, lengthscale=0.3, std=0.7,
                                generator=torch.Generator().manual_seed(seed))
    blocks = adjoint.layers(perceptron, weights)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    runners = {
        "backprop": lambda: adjoint.integrate(x, blocks, mode="backprop"),
        "adjoint-euler": lambda: adjoint.integrate(x, blocks, mode="adjoint"),
        "checkpoint-sqrtN": lambda: adjoint.checkpointed(x, blocks, segments=round(math.sqrt(depth))),
        "torchdiffeq-odeint_adjoint": lambda: adjoint.torchdiffeq_adjoint(x, blocks),
    }
    times, memory = {}, {}
    for name, run in runners.items():
        memory[name] = adjoint.saved_tensor_bytes(lambda: run().square().sum())
        run().square().sum().backward()  # warm-up, not timed
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            run().square().sum().backward()
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples)
    stamp = datetime.date.today().isoformat()
    return [{"name": name, "configuration": f"Euler ResNet, perceptron q=16 m=32 tanh, depth {depth}, 256 inputs, float32",
             "time_s": times[name], "baseline": "backprop", "baseline_time_s": times["backprop"],
             "time_ratio": times[name] / times["backprop"], "saved_bytes": memory[name],
             "memory_ratio": memory[name] / memory["backprop"], "machine": machine(),
             "resnode": resnode.__version__, "date": stamp} for name in runners]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works")
    parser.add_argument("--out", type=Path, default=None, help="where to write the records (JSON list)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = measure(depth=32 if args.smoke else 1000, repeats=1 if args.smoke else 5)
    print(f"{'method':28s} {'time (s)':>9s} {'x backprop':>11s} {'saved MiB':>10s} {'x backprop':>11s}")
    for r in records:
        print(f"{r['name']:28s} {r['time_s']:9.3f} {r['time_ratio']:11.2f} {r['saved_bytes'] / 2**20:10.3f} {r['memory_ratio']:11.4f}")
    print("machine:", records[0]["machine"])
    out = args.out if args.out is not None else (None if args.smoke else Path(__file__).with_name("results.json"))
    if out is not None:
        out.write_text(json.dumps(records, indent=1) + "\n")
        print("wrote", out)


if __name__ == "__main__":
    main()
