"""Peak memory and time of the contrastive loss, forward + backward: naive vs chunked.

    python benchmarks/bench_loss_memory.py [--batches 8 32] [--queue 128] [--size 224]
                                           [--chunk-size 8192] [--threads 1] [--repeats 3]

Setting: query embedding B x 32 x S x S (requiring grad, as the model's output would), 50% of the
pixels foreground (i.i.d.), B unit prototypes, a full queue of K unit negatives, tau 0.5.

How memory is measured (CPU): each (variant, batch) runs in a fresh subprocess, so no allocator
state or earlier peak leaks between variants. The child builds its inputs, runs a tiny warm-up of
the loss (library initialisation), then resets the kernel's resident-set high-water mark
(``echo 5 > /proc/self/clear_refs``), records VmRSS, runs one forward + backward and reads VmHWM:
peak = VmHWM - VmRSS before, i.e. the most memory the loss held at once, including the gradient of
the embedding it produces (the "floor" column, which any implementation must allocate). glibc is
told to serve blocks >= 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), which also disables its
adaptive threshold, so freed tensors leave the resident set at once and RSS tracks live tensors.
(tracemalloc does not see torch's allocations; torch's CPU allocator keeps no cache.) Times are
the median of ``--repeats`` further forward + backward passes in the same child.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from procstat import status_kib  # noqa: E402


def child(variant: str, batch: int, args: argparse.Namespace) -> dict:
    """Measure one variant at one batch size; runs inside a fresh interpreter."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from stages.train.loss import contrastive_loss, contrastive_loss_naive

    torch.set_num_threads(args.threads)
    if variant == "naive":
        loss_fn = contrastive_loss_naive
    else:
        def loss_fn(*a):
            return contrastive_loss(*a, chunk_size=args.chunk_size)

    def inputs(b: int, size: int):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(b, args.dim, size, size, generator=g).requires_grad_()
        masks = torch.rand(b, size, size, generator=g) < args.foreground
        protos = F.normalize(torch.randn(b, args.dim, generator=g), dim=1)
        queue = F.normalize(torch.randn(args.queue, args.dim, generator=g), dim=1)
        return q, masks, protos, queue

    def step(q, masks, protos, queue) -> float:
        loss = loss_fn(q, masks, protos, queue, args.temperature)
        loss.backward()
        q.grad = None
        return loss.item()

    step(*inputs(2, 16))  # warm-up: kernels and autograd engine, outside the measurement
    q, masks, protos, queue = inputs(batch, args.size)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = status_kib("VmRSS")
    start = time.perf_counter()
    value = step(q, masks, protos, queue)
    first = time.perf_counter() - start
    peak = status_kib("VmHWM") - before
    times = [first]
    for _ in range(args.repeats):
        start = time.perf_counter()
        step(q, masks, protos, queue)
        times.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "batch": batch,
        "anchors": int(masks.sum()),
        "loss": value,
        "peak_mib": peak / 1024,
        "floor_mib": q.numel() * q.element_size() / 2**20,
        "time_s": statistics.median(times[1:] if args.repeats else times),
    }


def run_child(variant: str, batch: int, argv: list[str]) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, str(batch), *argv],
        env=env, check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--queue", type=int, default=128)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--foreground", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--chunk-size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args)))
        return

    argv = sys.argv[1:]
    print(
        f"contrastive loss fwd+bwd, {args.size}x{args.size}, D {args.dim}, K {args.queue}, "
        f"{args.foreground:.0%} foreground, chunk {args.chunk_size}, {args.threads} thread(s)"
    )
    print(
        f"{'batch':>5} {'variant':>8} {'anchors':>9} {'peak MiB':>9} {'floor MiB':>9}"
        f" {'time s':>7} {'loss':>8}"
    )
    for batch in args.batches:
        rows = {v: run_child(v, batch, argv) for v in ("naive", "chunked")}
        for r in rows.values():
            print(
                f"{batch:>5} {r['variant']:>8} {r['anchors']:>9} {r['peak_mib']:>9.1f} "
                f"{r['floor_mib']:>9.1f} {r['time_s']:>7.3f} {r['loss']:>8.5f}"
            )
        naive, chunked = rows["naive"], rows["chunked"]
        print(
            f"{batch:>5} ratio naive/chunked: peak {naive['peak_mib'] / chunked['peak_mib']:.1f}x, "
            f"time {naive['time_s'] / chunked['time_s']:.2f}x, "
            f"|loss diff| {abs(naive['loss'] - chunked['loss']):.1e}"
        )


if __name__ == "__main__":
    main()
