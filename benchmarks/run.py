"""resnode's benchmarks: every measurement is a ratio between implementations timed in one run, on one machine.

Sections (all by default; ``--only`` picks some):

- ``engine``: one full-batch gradient step (forward, loss, backward) of Marion et al.'s residual network
  (GELU perceptron, q = 16, m = 32, n = 100, float32) at L = 64, 1024, 16384: the fused engine
  (``resnode.engine``, its depth loops compiled, and through torch as on a GPU or without a C compiler)
  against autograd looping over ``unbind()``, the same loop under ``torch.compile`` (the whole loop, unrolled into
  one graph; L = 1024, with its compilation time), and
  autograd indexing the stacked tensor ``W[k]`` (quadratic backward, so skipped beyond L = 1024); time per step against L with the
  fitted exponent; peak memory of a 500-iteration L = 16384 gradient-flow run with the recorders of the
  Fig. 1 chapter (a child process; its peak resident memory over an idle child's).
- ``adjoint``: one forward + backward of a depth-1000 Euler ``resnode.ResNet`` (an ``nn.Module`` tanh perceptron
  block, 256 inputs) with ``backward="backprop"``, ``"adjoint"``, ``"checkpoint"``, against torchdiffeq's
  ``odeint_adjoint``; and the same with stacked weights; time and the bytes autograd keeps for the backward.
- ``images``: training throughput (images/s through ``resnode.images.fit``) of Marion et al.'s CIFAR network and of a
  narrow ResNet-101 layout, eager float32 against the fast path (channels_last, bf16 autocast, and ``torch.compile``
  with ``--compile``), and the memory a training step keeps with the adjoint in stage 3 against backprop
  (``images.step_memory``: the CUDA allocator's peak on a GPU, the tensors autograd saves on the CPU).
- ``sweep``: the cost ``resnode.sweep`` adds to each point (a kernel started, resnode imported, the record written
  and read back), from a chapter-shaped notebook that computes nothing: one point alone, and the wall time per
  point of a grid on a local pool of 2 workers, against ``python -c "import resnode"`` in a fresh interpreter.
- ``book``: wall time of every chapter executed with its ``book`` profile (papermill), their sum, and with
  ``--workers N`` the wall time of the whole book run N chapters at a time (as the test command does).

    python benchmarks/run.py                    # everything; writes benchmarks/results.json
    python benchmarks/run.py --only engine      # one section; other sections' records are kept
    python benchmarks/run.py --only book --workers 2   # the book, two chapters at a time
    python benchmarks/run.py --smoke --out F    # seconds: checks the script runs, times nothing of note
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import resnode
from resnode import adjoint, engine, flow, init, metrics, models, native, recorders

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("engine", "adjoint", "images", "sweep", "book")


def machine() -> str:
    return (f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
            f"{len(__import__('os').sched_getaffinity(0))} cores, {platform.system()}, torch {torch.__version__}")


def record(section: str, name: str, configuration: str, time_s: float | None, baseline: str | None = None,
           baseline_time_s: float | None = None, **extra) -> dict:
    ratio = None if time_s is None or baseline_time_s is None else baseline_time_s / time_s
    return {"section": section, "name": name, "configuration": configuration, "time_s": time_s,
            "baseline": baseline, "baseline_time_s": baseline_time_s, "speedup_over_baseline": ratio, **extra,
            "machine": machine(), "resnode": resnode.__version__, "date": datetime.date.today().isoformat()}


def median_time(run, repeats: int) -> float:
    run()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# --- engine -------------------------------------------------------------------------------------------

def marion_network(depth: int, dim: int = 16, width: int = 32, n: int = 100, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, n, dim, generator=g)
    W = torch.randn(width, dim, generator=g).expand(depth, width, dim).contiguous()  # weight-tied
    V = 0.1 * torch.randn(depth, dim, width, generator=g)
    spec = engine.Residual("gelu", step=1 / depth, inner=dim**-0.5, outer=width**-0.5)
    return x, y, W, V, spec


def step_runners(depth: int) -> dict:
    x, y, W, V, spec = marion_network(depth)
    perceptron = models.Perceptron(16, 32, "gelu")
    workspace = engine.Workspace()

    def fused():
        flow.loss_and_grads(x, y, {"W": W, "V": V}, spec, workspace=workspace)

    def fused_torch_loops():
        with native.torch_loops():
            fused()

    Wp, Vp = W.clone().requires_grad_(), V.clone().requires_grad_()

    def unbind():
        h = x
        for Vk, Wk in zip(Vp.unbind(0), Wp.unbind(0)):
            h = h + spec.step * perceptron(h, Vk, Wk)
        (h - y).square().sum(-1).mean().backward()
        Wp.grad = Vp.grad = None

    def indexed():
        h = x
        for k in range(depth):
            h = h + spec.step * perceptron(h, Vp[k], Wp[k])
        (h - y).square().sum(-1).mean().backward()
        Wp.grad = Vp.grad = None

    def loss(V, W):
        h = x
        for Vk, Wk in zip(V.unbind(0), W.unbind(0)):
            h = h + spec.step * perceptron(h, Vk, Wk)
        return (h - y).square().sum(-1).mean()

    compiled_loss = torch.compile(loss, dynamic=False)  # the whole loop, unrolled into one graph on the first call

    def compiled():
        compiled_loss(Vp, Wp).backward()
        Wp.grad = Vp.grad = None

    return {"engine": fused, "engine-torch-loops": fused_torch_loops, "autograd-unbind": unbind,
            "autograd-indexed": indexed, "autograd-unbind-torch.compile": compiled}


def check_agreement(depth: int) -> dict[str, float]:
    """Largest relative difference of the fused loss and gradients from autograd's (float32), for the engine
    with compiled loops and with torch loops."""
    x, y, W, V, spec = marion_network(depth)
    Wp, Vp = W.clone().requires_grad_(), V.clone().requires_grad_()
    perceptron = models.Perceptron(16, 32, "gelu")
    h = models.euler(x, perceptron, (Vp, Wp), spec.step)
    reference = (h - y).square().sum(-1).mean()
    reference.backward()
    worst = {}
    for name, loops in (("engine", contextlib.nullcontext), ("engine-torch-loops", native.torch_loops)):
        with loops():
            loss, grads = flow.loss_and_grads(x, y, {"W": W, "V": V}, spec)
        worst[name] = max(abs(loss.item() - reference.item()) / reference.item(),
                          ((grads["W"] - Wp.grad).norm() / Wp.grad.norm()).item(),
                          ((grads["V"] - Vp.grad).norm() / Vp.grad.norm()).item())
    return worst


def engine_section(smoke: bool) -> list[dict]:
    config = "Marion et al. eq. (3), GELU, q=16, m=32, n=100, float32, one full-batch gradient step"
    depths = (16, 64) if smoke else (64, 1024, 16384)
    out = []
    for depth in depths:
        runners = step_runners(depth)
        repeats = 1 if smoke else (5 if depth <= 1024 else 2)
        times = {name: median_time(runners[name], repeats * (1 if smoke else 4))
                 for name in ("engine", "engine-torch-loops")}
        times["autograd-unbind"] = median_time(runners["autograd-unbind"], repeats)
        if depth <= 1024:
            times["autograd-indexed"] = median_time(runners["autograd-indexed"], 1 if depth > 64 else repeats)
        extra = {}
        if depth == (16 if smoke else 1024):
            start = time.perf_counter()
            runners["autograd-unbind-torch.compile"]()  # compiles
            extra["compile_s"] = time.perf_counter() - start
            times["autograd-unbind-torch.compile"] = median_time(runners["autograd-unbind-torch.compile"], repeats)
        agreement = check_agreement(depth)
        for ours, baseline in (("engine", "autograd-unbind"), ("engine", "autograd-indexed"),
                               ("engine", "autograd-unbind-torch.compile"), ("engine-torch-loops", "autograd-unbind")):
            if baseline in times:
                out.append(record("engine", f"{ours} vs {baseline}", f"{config}, L={depth}", times[ours],
                                  baseline, times[baseline], depth=depth, max_relative_difference=agreement[ours],
                                  **(extra if baseline.endswith("compile") else {})))
    grid = (8, 16, 32) if smoke else (64, 256, 1024, 4096, 16384)
    per_step = []
    for depth in grid:
        per_step.append(median_time(step_runners(depth)["engine"], 1 if smoke else 3))
    slope = metrics.loglog_slope(grid, per_step)
    out.append(record("engine", "engine time against depth", f"{config}, L in {list(grid)}", None,
                      depths=list(grid), times_s=per_step, fitted_exponent=slope))
    out.append(peak_memory_record(steps=5 if smoke else 500, depth=64 if smoke else 16384))
    return out


def _flow_run(depth: int, steps: int) -> None:
    """The Fig. 1 run of the Marion chapter: gradient flow with the max-increment, loss and snapshot recorders."""
    x, y, W, V, spec = marion_network(depth)
    V.zero_()
    recs = [recorders.Loss(), recorders.MaxIncrement(range(0, steps + 1, max(1, steps // 10))),
            recorders.Snapshots(range(0, steps + 1, max(1, steps // 10)), stride=max(1, depth // 1024))]
    flow.gradient_flow(x, y, {"W": W, "V": V}, spec, steps=steps, dt=0.01, scale=1 / 16, recorders=recs)


def peak_memory_record(steps: int, depth: int) -> dict:
    # VmHWM is this process's own peak: ru_maxrss would also count its parent's when the child was spawned by vfork
    code = ("import sys; sys.path.insert(0, {root!r}); import runpy; "
            "m = runpy.run_path({script!r}); {call}; "
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    script = str(Path(__file__).resolve())
    peaks, times = {}, {}
    for label, call in (("idle", "None"), ("run", f"m['_flow_run']({depth}, {steps})")):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT), script=script, call=call)],
                                capture_output=True, text=True, check=True)
        times[label] = time.perf_counter() - start
        peaks[label] = int(result.stdout.split()[-1]) * 1024  # in KiB
    state = depth * 100 * (16 + 2 * 32) * 4  # states, activations and pre-activations of one step (float32)
    return record("engine", "gradient-flow run peak memory",
                  f"{steps} iterations, L={depth}, GELU q=16 m=32 n=100 float32, recorders: loss, max increment, "
                  f"snapshots every {max(1, steps // 10)} iterations", times["run"] - times["idle"],
                  peak_bytes_over_idle=peaks["run"] - peaks["idle"], one_step_trace_bytes=state)


# --- adjoint ------------------------------------------------------------------------------------------

def adjoint_section(smoke: bool) -> list[dict]:
    """``resnode.ResNet`` with an ``nn.Module`` block (a tanh perceptron with biases) and each backward pass, against
    torchdiffeq's ``odeint_adjoint`` over the same blocks; and the same ResNet with its weights stacked across depth
    (``models.Perceptron``), whose adjoint differentiates slices of the stacked tensors."""
    depth, repeats = (32, 1) if smoke else (1000, 5)
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
    net = resnode.ResNet(block, depth)
    stacked = resnode.ResNet(models.Perceptron(dim=16, width=32, activation="tanh"), depth, init="smooth",
                             lengthscale=0.3, std=0.7, generator=torch.Generator().manual_seed(0))
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()

    def front_door(network, backward):
        def run():
            network.backward = backward
            return network(x)
        return run

    runners = {
        "backprop": front_door(net, "backprop"),
        "adjoint-euler": front_door(net, "adjoint"),
        "checkpoint-sqrtN": front_door(net, "checkpoint"),
        "torchdiffeq-odeint_adjoint": lambda: adjoint.torchdiffeq_adjoint(x, list(net.blocks)),
        "stacked weights: backprop": front_door(stacked, "backprop"),
        "stacked weights: adjoint-euler": front_door(stacked, "adjoint"),
    }
    times, memory = {}, {}
    for name, run in runners.items():
        memory[name] = adjoint.saved_tensor_bytes(lambda: run().square().sum())
        times[name] = median_time(lambda: run().square().sum().backward(), repeats)
    out = []
    for name in runners:
        base = "stacked weights: backprop" if name.startswith("stacked") else "backprop"
        kind = "stacked Perceptron weights" if name.startswith("stacked") else "nn.Module block Linear-Tanh-Linear"
        config = (f"resnode.ResNet, Euler, {kind}, q=16 m=32, depth {depth}, 256 inputs, float32, forward + backward")
        out.append(record("adjoint", name, config, times[name], base, times[base], time_over_backprop=times[name] / times[base],
                          saved_bytes=memory[name], memory_over_backprop=memory[name] / memory[base]))
    return out


# --- images -------------------------------------------------------------------------------------------

def images_section(smoke: bool, compile_too: bool = False) -> list[dict]:
    """Images/s of a training epoch (``images.fit`` on random CIFAR-shaped images) in float32 eager against the fast
    path, and the memory of one training step with the adjoint in stage 3 against backprop, at two stage depths."""
    from resnode import data, images

    device = images.resolve_device("auto")
    n, depth, widths, stage3 = (64, 2, (2, 4, 8, 16), (2, 4)) if smoke else (512, 32, (16, 32, 64, 128), (8, 32))
    g = torch.Generator().manual_seed(0)
    train = data.Dataset(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), "random CIFAR-shaped")
    test = data.Dataset(train.inputs[:64], train.targets[:64], "random CIFAR-shaped (64)")
    networks = {
        ("marion", f"Marion et al. net, L={depth}, GELU"): lambda: images.marion_resnet(depth, "gelu", "tied"),
        ("resnet101", f"ResNet-101 layout (3, 4, 23, 3), widths {widths}"): lambda: images.sander_resnet(images.RESNET101, widths),
    }
    variants = {"eager float32": dict(channels_last=False, bf16=False, compile=False),
                "channels_last": dict(channels_last=True, bf16=False, compile=False),
                "channels_last + bf16 autocast": dict(channels_last=True, bf16=True, compile=False)}
    if compile_too:
        variants["channels_last + bf16 + torch.compile"] = dict(channels_last=True, bf16=True, compile=True)
    out = []
    for (short, label), make in networks.items():
        rates = {}
        for variant, options in variants.items():
            torch.manual_seed(0)  # two epochs, the second timed: the first pays for the kernels' set-up (and the compilation)
            history = images.fit(make(), train, test, 2, batch_size=64, device=device, **options)
            rates[variant] = history["images_per_second"][-1]
        for variant, rate in rates.items():
            out.append(record("images", f"{short}: {variant}", f"{label}, batch 64, second epoch of {n} images, {device.type}",
                              n / rate, "eager float32", n / rates["eager float32"], images_per_second=rate,
                              device=device.type))
    x, y = train.inputs[:64].to(device), train.targets[:64].to(device)
    memory, times = {}, {}
    for blocks in stage3:
        for mode in ("backprop", "adjoint"):
            torch.manual_seed(0)
            net = images.sander_resnet((3, 4, blocks, 3), widths, adjoint_stages=(3,) if mode == "adjoint" else ()).to(device)
            memory[blocks, mode] = images.step_memory(net, x, y)
            step = lambda: torch.nn.functional.cross_entropy(net(x), y).backward()
            times[blocks, mode] = median_time(step, 1 if smoke else 3)
    for (blocks, mode), m in memory.items():
        base = memory[blocks, "backprop"]["bytes"]
        out.append(record("images", f"step memory, {mode}", f"ResNet (3, 4, {blocks}, 3), widths {widths}, stage 3 by {mode}, "
                          f"batch 64 of 32x32, {device.type}", times[blocks, mode], "backprop", times[blocks, "backprop"],
                          step_bytes=m["bytes"], memory_measure=m["measure"], memory_over_backprop=m["bytes"] / base,
                          stage3_blocks=blocks, time_over_backprop=times[blocks, mode] / times[blocks, "backprop"],
                          device=device.type))
    return out


# --- book ---------------------------------------------------------------------------------------------

def _previous_times() -> dict[str, float]:
    path = Path(__file__).with_name("results.json")
    records = json.loads(path.read_text()) if path.exists() else []
    return {r["name"]: r["time_s"] for r in records if r.get("section") == "book" and r.get("time_s")}


def sweep_section(smoke: bool) -> list[dict]:
    """Per-point overhead of ``resnode.sweep`` on a notebook that only declares its parameters, imports resnode,
    makes its record and publishes it: one point alone, then a grid of points on 2 workers (wall time per point)."""
    import nbformat

    from resnode import sweep

    cells = ['profile: str = "smoke"  # profile\nseed: int = 0  # seed',
             "from resnode import profiles, records\nparams = profiles.parameters(globals())\n"
             "record = records.Record('99_empty', profiles.settings(params, smoke={}, book={}, paper={}))",
             "record.publish();"]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    notebook.cells[0].metadata["tags"] = ["parameters"]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    count = 2 if smoke else 8
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "99_empty.ipynb"
        nbformat.write(notebook, str(path))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import resnode"], check=True)
        import_time = time.perf_counter() - start
        single = []
        for seed in range(1 if smoke else 3):
            start = time.perf_counter()
            sweep.run(path, [{"seed": seed}], Path(tmp) / f"one{seed}", workers=1, progress=False)
            single.append(time.perf_counter() - start)
        start = time.perf_counter()
        results = sweep.run(path, sweep.grid(seed=range(count)), Path(tmp) / "grid", workers=2, progress=False)
        grid_time = time.perf_counter() - start
        assert all(r["status"] == "done" for r in results), [r.get("error") for r in results]
    one = statistics.median(single)
    return [record("sweep", "one point, alone", "empty chapter-shaped notebook, papermill, median of runs", one,
                   "python -c 'import resnode'", import_time),
            record("sweep", f"grid of {count} points, 2 workers", "the same notebook; wall time per point",
                   grid_time / count, "one point, alone", one)]


def book_section(smoke: bool, workers: int = 1) -> list[dict]:
    """Every chapter under papermill, ``workers`` at a time (one process each, longest previous time first)."""
    import papermill

    profile = "smoke" if smoke else "book"
    previous = _previous_times()
    chapters = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"), key=lambda c: -previous.get(c.stem, 0.0))
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        def run(chapter: Path) -> None:
            start = time.perf_counter()
            papermill.execute_notebook(str(chapter), str(Path(tmp) / chapter.name), parameters={"profile": profile},
                                       kernel_name="python3", cwd=str(chapter.parent), progress_bar=False)
            times[chapter.stem] = time.perf_counter() - start
            print(f"  {chapter.stem}: {times[chapter.stem]:.0f} s", flush=True)

        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:  # papermill runs each chapter in its own kernel process
            list(pool.map(run, chapters))
        wall = time.perf_counter() - start
    out = [record("book", stem, f"profile={profile}, papermill, {workers} at a time", times[stem])
           for stem in sorted(times)]
    out.append(record("book", "whole book, sum of chapters", f"profile={profile}, {len(chapters)} chapters",
                      sum(times.values())))
    if workers > 1:
        out.append(record("book", f"whole book, {workers} workers", f"profile={profile}, {len(chapters)} chapters, "
                          f"wall time, {workers} chapters at a time", wall))
    return out


# --- main ---------------------------------------------------------------------------------------------

def table(records: list[dict]) -> str:
    lines = [f"{'section':8s} {'name':46s} {'time (s)':>9s} {'speed-up':>9s}  notes"]
    for r in records:
        notes = {k: r[k] for k in ("max_relative_difference", "fitted_exponent", "peak_bytes_over_idle",
                                   "time_over_backprop", "memory_over_backprop", "images_per_second") if k in r}
        t = "" if r["time_s"] is None else f"{r['time_s']:9.3f}"
        s = "" if r["speedup_over_baseline"] is None else f"{r['speedup_over_baseline']:9.2f}"
        label = r["name"] + ("" if "depth" not in r else f" (L={r['depth']})")
        lines.append(f"{r['section']:8s} {label:46s} {t:>9s} {s:>9s}  "
                     + ", ".join(f"{k}={v:.4g}" for k, v in notes.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    parser.add_argument("--out", type=Path, default=None, help="records file (default benchmarks/results.json; "
                                                               "with --smoke nothing is written unless given)")
    parser.add_argument("--workers", type=int, default=1, help="chapters executed at once in the book section "
                                                               "(each in its own kernel; default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the per-layer calls are too small to share)")
    parser.add_argument("--compile", action="store_true", help="images section: also time torch.compile (minutes of compilation)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = {"engine": engine_section, "adjoint": adjoint_section,
                "images": lambda smoke: images_section(smoke, args.compile),
                "sweep": sweep_section, "book": lambda smoke: book_section(smoke, args.workers)}
    records = []
    for name in args.only:
        print(f"[{name}]", flush=True)
        records += sections[name](args.smoke)
    print(table(records))
    print("machine:", machine())
    out = args.out if args.out is not None else (None if args.smoke else Path(__file__).with_name("results.json"))
    if out is not None:
        kept = []
        if out.exists():
            kept = [r for r in json.loads(out.read_text()) if r.get("section") not in args.only]
        out.write_text(json.dumps(kept + records, indent=1, default=float) + "\n")
        print("wrote", out)


if __name__ == "__main__":
    main()
