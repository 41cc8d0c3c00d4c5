"""Throughput and peak memory of one MaskContrast training step on the CPU.

    python benchmarks/bench_train_step.py [--backbones mobilenet_v2 resnet50] [--batch 8]
                                          [--size 224] [--steps 3] [--threads 0]
                                          [--layouts fast plain] [--speed-only]

A step is ``stages.train.step.train_step``: query forward + backward, momentum update, key
forward, prototypes, contrastive + balanced BCE loss, SGD step, enqueue; output stride 8, 32-d
embedding, a full queue of K = 2 x batch, 50 % foreground squares as masks, synthetic uint8
images (no data loading). Two loss implementations run the same step: ``chunked`` (the library's
``contrastive_loss``, anchors in blocks) and ``naive`` (``contrastive_loss_naive``, the reference's
full anchors x (B + K) logit matrix), the baseline. Two network layouts run the chunked step:
``fast`` (the library's: channels-last tensors, ASPP branches that skip the kernel taps reading
only padding) and ``plain`` (NCHW tensors and plain 3x3 atrous convolutions, the straightforward
baseline); the results are the same up to float rounding.

Each (backbone, loss) runs in a fresh interpreter, so peaks do not leak between rows. The child
builds everything (the queue filled with random unit prototypes), runs one warm-up step, resets
the kernel's resident-set high-water mark (``/proc/self/clear_refs``), then times ``--steps``
steps: images/s = batch x steps / seconds; peak RSS = VmHWM over those steps (the whole process:
model, key encoder, optimiser state, activations); "step peak" = VmHWM - VmRSS before them, the
memory one step adds. Speed and memory come from two separate children: the memory one makes
glibc serve blocks >= 64 KiB with mmap so freed tensors leave the resident set (as in
bench_loss_memory.py), which makes every large allocation a fresh mmap + page faults and slows a
step down by 10-30x; the speed one runs with the default allocator, as training does.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from procstat import status_kib  # noqa: E402


def child(backbone: str, loss: str, layout: str, args: argparse.Namespace) -> dict:
    """Measure one configuration inside a fresh interpreter."""
    import torch

    sys.path.insert(0, str(REPO))
    from stages.network.model import AtrousConv2d
    from stages.train import step as step_module
    from stages.train.checkpoint import build_model
    from stages.train.params import TrainParams
    from stages.train.step import build_encoders, model_config, train_step
    from stages.train.loss import contrastive_loss, contrastive_loss_naive

    if layout == "plain":
        AtrousConv2d.forward = torch.nn.Conv2d.forward  # every tap, padding included
        fast_normalize = step_module.normalize_images
        step_module.normalize_images = lambda x: fast_normalize(x).contiguous()  # NCHW

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, s = args.batch, args.size
    params = TrainParams(backbone=backbone, batch_size=b, queue_size=2 * b, crop_size=s)
    enc = build_encoders(build_model(model_config(params)), params, torch.device("cpu"))
    if layout == "plain":
        for net in (enc.model, enc.key):
            net.to(memory_format=torch.contiguous_format)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g) for _ in range(2)]
    masks = torch.zeros(b, s, s, dtype=torch.bool)
    side = int(s * 0.5 ** 0.5)  # 50 % foreground
    for i in range(b):
        y, x = torch.randint(0, s - side + 1, (2,), generator=g).tolist()
        masks[i, y:y + side, x:x + side] = True
    fn = contrastive_loss if loss == "chunked" else contrastive_loss_naive

    def step() -> float:
        return train_step(enc, images[0], masks, images[1], masks, temperature=0.5, key_momentum=0.999,
                          contrastive_fn=fn)[0].item()

    for _ in range(2):  # a full queue of unit prototypes, as after the first two steps of training
        enc.queue.enqueue(torch.nn.functional.normalize(torch.randn(b, params.embedding_dim, generator=g), dim=1))
    step()  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status_kib("VmRSS")
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    hwm = status_kib("VmHWM")
    return {"backbone": backbone, "loss": loss, "layout": layout, "images_per_s": b * args.steps / seconds,
            "seconds_per_step": seconds / args.steps, "peak_rss_mib": hwm / 1024,
            "step_peak_mib": (hwm - before) / 1024, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--losses", nargs="+", default=["chunked", "naive"], choices=["chunked", "naive"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--speed-only", action="store_true",
                        help="skip the memory child (its mmap allocator makes steps 10-30x slower)")
    parser.add_argument("--layouts", nargs="+", default=["fast", "plain"], choices=["fast", "plain"])
    parser.add_argument("--child", nargs=3, metavar=("BACKBONE", "LOSS", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    common = ["--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps),
              "--threads", str(args.threads)]
    print(f"train step, batch {args.batch}, {args.size}x{args.size}, output stride 8, K = {2 * args.batch}, "
          f"{args.steps} timed steps after 1 warm-up, CPU ({os.cpu_count()} cores)")
    print(f"{'backbone':<14}{'loss':<9}{'layout':<8}{'images/s':>10}{'s/step':>9}{'peak RSS MiB':>14}"
          f"{'step peak MiB':>15}")
    first = args.layouts[0]
    for backbone in args.backbones:
        rows = {}
        runs = [(loss, first) for loss in args.losses] + [("chunked", lay) for lay in args.layouts[1:]
                                                         if "chunked" in args.losses]
        for loss, layout in runs:
            argv = [sys.executable, __file__, "--child", backbone, loss, layout, *common]
            speed = subprocess.run(argv, capture_output=True, text=True, check=True)
            memory = speed if args.speed_only else subprocess.run(argv, env=env, capture_output=True, text=True,
                                                                  check=True)
            r = json.loads(memory.stdout.strip().splitlines()[-1])
            r.update({k: v for k, v in json.loads(speed.stdout.strip().splitlines()[-1]).items()
                      if k in ("images_per_s", "seconds_per_step")})
            rows[loss, layout] = r
            print(f"{backbone:<14}{loss:<9}{layout:<8}{r['images_per_s']:>10.2f}{r['seconds_per_step']:>9.2f}"
                  f"{r['peak_rss_mib']:>14.0f}{r['step_peak_mib']:>15.0f}", flush=True)
        if {("chunked", first), ("naive", first)} <= rows.keys():
            c, n = rows["chunked", first], rows["naive", first]
            print(f"{'':<14}chunked / naive: speed x{c['images_per_s'] / n['images_per_s']:.2f}, "
                  f"step peak x{c['step_peak_mib'] / max(n['step_peak_mib'], 1e-9):.2f}")
        if {("chunked", "fast"), ("chunked", "plain")} <= rows.keys():
            f, p = rows["chunked", "fast"], rows["chunked", "plain"]
            print(f"{'':<14}fast / plain layout: speed x{f['images_per_s'] / p['images_per_s']:.2f}", flush=True)


if __name__ == "__main__":
    main()
