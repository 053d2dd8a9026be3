"""The GPU figures that bench/scale.py would otherwise assume, measured on whatever CUDA card is present.

    python bench/gpu.py [--sizes 128 160] [--batch-sizes 32 64] [--steps 80] [--sharing 1 2 4 8] [--quick]

Everything goes through the code a Tune trial runs on a GPU (xray_ray.model.train / models / augment: bf16
autocast, channels_last, EMA), without Ray, so it runs where only torch is installed (the lent GPU machine
has no Ray):
  check        the seed model's logits on the GPU (bf16 autocast) against a float64 CPU reference of the
               same weights (relative error), and a state dict saved on the GPU and loaded back with
               torch.load(weights_only=True) giving the same logits; then a short training of a small CNN
               on synthetic phantoms, on the GPU, whose validation AUC (median of 3 seeds) must clear
               0.65, as tests/model/test_train.py asks of the CPU (chance is 0.5)
  train        training images/s of the "seed" preset per image size and batch size: uint8 batches from
               pinned host memory, copied and trained as trial_loop.run_trial does (after `--warmup` steps)
  eval         prediction images/s, batch 256 (eval_speedup = eval / train at batch 32)
  sharing      K processes training at once on the one GPU (what --gpus-per-trial 1/K does): images/s of
               each and of all together
  augment      xray_ray.data.augment.augment_batch at seed.yaml's strongest settings on one CPU thread: the CPU
               work each GPU trial needs per image (it runs in Ray Data tasks, on CPU cores)
With no GPU it measures the CPU instead (CI runs --quick to prove the script works); the JSON says which.
bench/scale.py reads bench/measured/gpu_h200.json (this output from a real card) in place of its
assumptions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PHANTOM_SEEDS = (0, 1, 2)
# seed.yaml's strongest augmentation (its ranges' upper ends)
SEED_STRENGTHS = {
    "zoom": 0.3,
    "rotate": 15.0,
    "shift": 0.1,
    "vflip": 0.5,
    "brightness": 0.3,
    "contrast": 0.3,
    "gamma": 0.3,
}


def machine() -> dict:
    """common.machine(), with the card's details in place of its name."""
    import torch
    from common import machine as base

    m = base()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        m["gpu"] = {
            "name": p.name,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "sms": p.multi_processor_count,
            "capability": f"{p.major}.{p.minor}",
            "cuda": torch.version.cuda,
        }
    return m


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def seed_config(size: int, batch_size: int):
    """The seed preset as trial_throughput.py trains it, with EMA on (as the trainable would run it)."""
    from trial_throughput import trial_config

    return trial_config("seed", size, 10, batch_size).replace(ema=0.99)


def build(cfg, device):
    import torch

    from xray_ray.config import model_sizes
    from xray_ray.model.cnn import build_model

    torch.manual_seed(0)
    model = build_model(**model_sizes(cfg)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def train_rate(size: int, batch_size: int, steps: int, warmup: int, device) -> dict:
    """Training images/s of the seed preset over ``steps`` batches, as trial_loop.run_trial trains on ``device``."""
    import torch

    from xray_ray.model.train import make_ema, make_loss, make_optimizer, make_scheduler, train_one_epoch

    cfg = seed_config(size, batch_size)
    model = build(cfg, device)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps + warmup)
    ema = make_ema(model, cfg.ema)
    loss_fn = make_loss(cfg, 0.74)
    rng = np.random.default_rng(0)
    pool = torch.from_numpy(rng.integers(0, 256, (8, batch_size, size, size), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 2, (8, batch_size)).astype(np.int64))
    if device.type == "cuda":
        pool, labels = pool.pin_memory(), labels.pin_memory()

    def batches(n):
        for i in range(n):
            yield {"image": pool[i % 8], "label": labels[i % 8]}

    train_one_epoch(model, batches(warmup), opt, loss_fn=loss_fn, device=device, scheduler=sched, ema=ema)
    sync(device)
    t = time.perf_counter()
    stats = train_one_epoch(model, batches(steps), opt, loss_fn=loss_fn, device=device, scheduler=sched, ema=ema)
    sync(device)
    wall = time.perf_counter() - t
    mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {
        "size": size,
        "batch_size": batch_size,
        "images": stats["images"],
        "seconds": wall,
        "images_per_s": stats["images"] / wall,
        "peak_gpu_mb": mem,
    }


def eval_rate(size: int, images: int, device) -> dict:
    import torch

    from xray_ray.model.train import predict_probs

    model = build(seed_config(size, 32), device)
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(0, 256, (images, size, size), dtype=np.uint8))
    y = torch.zeros(images, dtype=torch.int64)
    batches = [{"image": x[i : i + 256], "label": y[i : i + 256]} for i in range(0, images, 256)]
    predict_probs(model, batches[:2], device=device)
    sync(device)
    t = time.perf_counter()
    _, p = predict_probs(model, batches, device=device)
    wall = time.perf_counter() - t
    assert len(p) == images and np.isfinite(p).all()
    return {"size": size, "images": images, "seconds": wall, "images_per_s": images / wall}


def augment_rate(size: int, images: int) -> dict:
    from xray_ray.data.augment import augment_batch

    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (images, size, size), dtype=np.uint8)
    augment_batch({"image": x[:32], "idx": np.arange(32)}, strengths=SEED_STRENGTHS, seed=0, epoch=0)
    t = time.perf_counter()
    for i in range(0, images, 32):
        out = augment_batch(
            {"image": x[i : i + 32], "idx": np.arange(i, i + 32)}, strengths=SEED_STRENGTHS, seed=0, epoch=1
        )
        assert out["image"].shape == x[i : i + 32].shape
    wall = time.perf_counter() - t
    return {"size": size, "images": images, "seconds": wall, "images_per_s": images / wall, "threads": 1}


def numerics(device, tmp: Path, size: int = 128) -> tuple[float, bool]:
    """The seed model's logits on ``device`` for 16 ``size`` px images against float64 on the CPU (relative
    error), and whether a weights-only checkpoint round trip gives the very same logits."""
    import torch

    from xray_ray.model.train import to_input

    cfg = seed_config(size, 32)
    model = build(cfg, device).eval()
    x = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (16, size, size), dtype=np.uint8))

    def logits(net) -> torch.Tensor:  # as predict_probs runs it: bf16 autocast on CUDA
        with (
            torch.no_grad(),
            torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
        ):
            return net(to_input(x, device)).float().cpu().double()

    got = logits(model)
    ref_model = build(cfg, torch.device("cpu")).double().eval()
    ref_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    with torch.no_grad():
        ref = ref_model(to_input(x, "cpu").double())
    rel = float((got - ref).norm() / ref.norm())
    path = tmp / "state.pt"
    torch.save({"model": model.state_dict()}, path)
    back = build(cfg, device).eval()
    back.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model"])
    return rel, bool(torch.equal(logits(back), got))


def phantom_aucs(device, quick: bool) -> tuple[int, list[float]]:
    """The learning check of tests/model/test_train.py (3 single-conv blocks, flatten, 48 px phantoms), on
    ``device``: (epochs, val AUC per seed of PHANTOM_SEEDS)."""
    import torch

    from xray_ray import metrics as M
    from xray_ray.config import TrialConfig
    from xray_ray.data.phantoms import render
    from xray_ray.model.cnn import build_model
    from xray_ray.model.train import (
        array_batches,
        make_loss,
        make_optimizer,
        make_scheduler,
        predict_probs,
        train_one_epoch,
    )

    n_train, n_val, epochs = (64, 32, 1) if quick else (1600, 400, 5)
    images = np.stack([render(7, i, i % 2, 48) for i in range(n_train + n_val)])
    labels = (np.arange(n_train + n_val) % 2).astype(np.int64)
    sizes = {"image_size": 48, "blocks": 3, "double_conv": False, "width": 16, "head": "flatten", "fc": (32,)}
    tcfg = TrialConfig(**sizes, epochs=epochs, lr=1e-3, batch_size=32)
    aucs = []
    for seed in PHANTOM_SEEDS:  # one seed can die (constant output) on this near-chance task: take the median
        torch.manual_seed(seed)
        tiny = build_model(**sizes).to(device)
        opt = make_optimizer(tiny, tcfg)
        sched = make_scheduler(opt, tcfg, -(-n_train // 32))
        loss_fn = make_loss(tcfg, 0.5)
        rng = np.random.default_rng(4 + seed)
        for _ in range(epochs):
            order = rng.permutation(n_train)
            train_one_epoch(
                tiny,
                array_batches(images[order], labels[order], 32),
                opt,
                loss_fn=loss_fn,
                device=device,
                scheduler=sched,
            )
        y, p = predict_probs(tiny, array_batches(images[n_train:], labels[n_train:], 256), device=device)
        aucs.append(float(M.roc_auc(y, p)))
    return epochs, aucs


def check(device, quick: bool, tmp: Path) -> dict:
    """Same function on the GPU as on the CPU, a weights-only checkpoint round trip, and learning."""
    rel, same = numerics(device, tmp, 64 if quick else 128)
    epochs, aucs = phantom_aucs(device, quick)
    auc = float(np.median(aucs))
    return {
        "logits_rel_error_vs_float64": rel,
        "logits_tolerance": 1e-2 if device.type == "cuda" else 1e-4,
        "checkpoint_roundtrip_identical": same,
        "phantom_epochs": epochs,
        "phantom_val_auc": auc,
        "phantom_val_auc_by_seed": aucs,
        "ok": bool(rel < (1e-2 if device.type == "cuda" else 1e-4) and same and auc > 0.65),
    }


def worker(args) -> None:
    """One of K processes sharing the GPU: train, print one JSON line."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(1)
    print(json.dumps(train_rate(args.sizes[0], args.batch_sizes[0], args.steps, args.warmup, device)), flush=True)


def sharing(k: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--sizes",
        str(args.sizes[0]),
        "--batch-sizes",
        str(args.batch_sizes[0]),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    t = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(k)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a sharing worker failed: {[p.returncode for p in procs]}")
    rows = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    each = [r["images_per_s"] for r in rows]
    return {
        "processes": k,
        "size": args.sizes[0],
        "batch_size": args.batch_sizes[0],
        "per_process_images_per_s": each,
        "total_images_per_s": float(sum(each)),
        "wall_seconds": wall,
    }


def print_summary(result: dict) -> None:
    """The check, the training rates, GPU sharing, eval and augmentation rates, as lines and tables."""
    from common import print_table

    device, chk, train, share = result["device"], result["check"], result["train"], result["sharing"]
    ev, aug = result["eval"], result["augment"]
    print(
        f"\n{device}: {result['machine']['gpu'] or result['machine']['cpu']}; check ok: {chk['ok']} "
        f"(logits rel err {chk['logits_rel_error_vs_float64']:.1e}, phantom AUC {chk['phantom_val_auc']:.3f})"
    )
    print_table(
        ["size", "batch", "train img/s", "peak GPU MB"],
        [[r["size"], r["batch_size"], r["images_per_s"], r["peak_gpu_mb"]] for r in train],
    )
    print_table(
        ["processes", "each img/s", "total img/s"],
        [[s["processes"], float(np.mean(s["per_process_images_per_s"])), s["total_images_per_s"]] for s in share],
    )
    print(
        f"eval {ev['images_per_s']:.0f} img/s ({result['eval_speedup']:.1f}x training); augment "
        f"{aug['images_per_s']:.0f} img/s per CPU thread -> {result['cores_per_gpu_trial_to_feed']:.1f} cores "
        f"feed one trial"
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 160])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--sharing", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to prove the script works (CI)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    import tempfile

    import torch
    from common import emit

    if args.quick:
        args.sizes, args.batch_sizes, args.steps, args.warmup, args.sharing = [32], [16], 2, 1, [1, 2]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # as trial_loop leaves it
    else:
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        chk = check(device, args.quick, Path(tmp))
    train = [train_rate(s, b, args.steps, args.warmup, device) for s in args.sizes for b in args.batch_sizes]
    ev = eval_rate(args.sizes[0], 1024 if not args.quick else 32, device)
    aug = augment_rate(args.sizes[0], 2048 if not args.quick else 32)
    share = [sharing(k, args) for k in args.sharing]
    base = next(r for r in train if r["size"] == args.sizes[0] and r["batch_size"] == args.batch_sizes[0])
    result = {
        "benchmark": "gpu",
        "quick": args.quick,
        "machine": machine(),
        "device": device.type,
        "check": chk,
        "train": train,
        "eval": ev,
        "eval_speedup": ev["images_per_s"] / base["images_per_s"],
        "augment": aug,
        "augment_strengths": SEED_STRENGTHS,
        "sharing": share,
        "cores_per_gpu_trial_to_feed": base["images_per_s"] / aug["images_per_s"],
        "seconds": time.perf_counter() - t0,
    }
    print_summary(result)
    emit(result, args.out, "gpu")


if __name__ == "__main__":
    main()
