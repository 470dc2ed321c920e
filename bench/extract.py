"""Descriptors per second: batched extraction against the one-image-at-a-time fp32 loop.

The baseline is how the GeM reference code extracts (a Python loop, one image per forward, fp32,
contiguous layout). The contender is ``model.extraction``: batches of one size, bf16 autocast
on a GPU, channels-last everywhere. Same network, same decoded images, same process;
the figure that matters is the ratio.

    python -m bench.extract                                  # ResNet-101/50 and Lite0, 1024 px
    python -m bench.extract --networks efficientnet_lite0 --images 64 --out bench/results/x.json

With ``--pipeline`` it measures the whole path instead, from JPEG bytes to stored descriptors:
the extract stage on a local Ray (decoding in Ray Data tasks, the network on an actor pool,
Parquet parts written) against the in-process extraction of the same photos (DataLoader
decoding beside the network) on the same cores, Lite0 + GeM at 1024 px, in ``--rounds``
alternating rounds (in-process alone, the stage, in-process beside the idle Ray), medians
compared. Photos are the shared real ones (``--photos``), or synthetic JPEGs where absent.

    python -m bench.extract --pipeline --images 373 --rounds 2 \
        --out bench/results/extract_pipeline_cpu.json
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import torch
import tyro
from PIL import Image

from bench import write_results
from model.extraction import (
    DEFAULT_SCALES,
    ArrayImages,
    ExtractOptions,
    ImageFiles,
    extract_descriptors,
)
from model.networks import NetworkMeta, build_network
from pipeline.extract import ExtractConf
from pipeline.extract import run as run_extract
from pipeline.ingest import IngestConf
from pipeline.ingest import run as run_ingest


@dataclass(frozen=True)
class BenchConf:
    networks: tuple[str, ...] = ("resnet101", "resnet50", "efficientnet_lite0")
    width: int = 1024
    height: int = 768
    images: int | None = None
    """Images per measurement; default 8 on a CPU, 256 on a GPU."""
    batch_size: int | None = None
    """Default: 64 on a GPU, 1 on a CPU (model.extraction's choice)."""
    warmup: int = 2
    device: str | None = None
    out: str | None = None
    """Write the figures as JSON here as well (and the printed lines beside it as .txt)."""
    pipeline: bool = False
    """Measure the Ray Data extract stage against in-process extraction (see the docstring)."""
    photos: str = "../shared/data/photos"
    rounds: int = 3
    """--pipeline: in-process and Ray runs, taking turns; the medians are compared."""


def _rate(net: torch.nn.Module, images: ArrayImages, options: ExtractOptions) -> float:
    """Images per second of one full extraction (returns NumPy, so the GPU has finished)."""
    started = time.perf_counter()
    extract_descriptors(net, images, options)
    return len(images) / (time.perf_counter() - started)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(conf: BenchConf) -> list[dict]:
    device = conf.device or ("cuda" if torch.cuda.is_available() else "cpu")
    count = conf.images or (256 if device == "cuda" else 8)
    rng = np.random.default_rng(0)
    # Decoded images: the benchmark measures the network path, not JPEG decoding.
    frames = [rng.integers(0, 256, (conf.height, conf.width, 3), dtype=np.uint8)] * count
    images = ArrayImages(frames)
    warm = ArrayImages(frames[: conf.warmup])
    one_by_one = ExtractOptions(
        batch_size=1, device=device, bf16=False, channels_last=False, progress=False
    )
    batched = ExtractOptions(batch_size=conf.batch_size, device=device, progress=False)
    multiscale = ExtractOptions(
        scales=DEFAULT_SCALES, batch_size=conf.batch_size, device=device, progress=False
    )
    batch = batched.batch_size_for(torch.device(device))
    print(
        f"device: {_device_name(device)}; torch {torch.__version__}; {count} images "
        f"{conf.width}x{conf.height}; GeM; batch {batch}, channels-last, "
        f"{'bf16' if device == 'cuda' else 'fp32'}"
    )
    header = (
        f"{'network':<20}{'1-by-1 fp32':>14}{'cirray':>12}{'ratio':>8}{'3 scales':>12}{'ratio':>8}"
    )
    print(header + "\n" + "-" * len(header))
    rows = []
    for name in conf.networks:
        net = build_network(NetworkMeta(backbone=name), weights=None).eval()
        for options in (one_by_one, batched, multiscale):
            extract_descriptors(net, warm, options)  # cuDNN autotuning, allocator, threads
        base = _rate(net, images, one_by_one)
        fast = _rate(net, images, batched)
        multi = _rate(net, images, multiscale)
        row = {
            "network": name,
            "one_by_one_fp32": base,
            "batched": fast,
            "batched_ratio": fast / base,
            "multiscale": multi,
            "multiscale_ratio": multi / base,
        }
        rows.append(row)
        print(
            f"{name:<20}{base:>10.1f} i/s{fast:>8.1f} i/s{fast / base:>7.2f}x"
            f"{multi:>8.1f} i/s{multi / base:>7.2f}x"
        )
    if conf.out:
        Path(conf.out).parent.mkdir(parents=True, exist_ok=True)
        payload = {"device": _device_name(device), "conf": asdict(conf), "rows": rows}
        Path(conf.out).write_text(json.dumps(payload, indent=2))
    return rows


def pipeline_main(conf: BenchConf) -> dict:
    """Photos per second from JPEG bytes to descriptors: the Ray stage against in-process."""
    count = conf.images or 48
    paths = _photo_files(Path(conf.photos), count)
    cores = os.cpu_count() or 1
    net = build_network(NetworkMeta(backbone="efficientnet_lite0"), "imagenet").eval()
    options = ExtractOptions(num_workers=1, device="cpu", progress=False)
    extract_descriptors(net, ImageFiles(paths[:2], conf.width, exif_transpose=True), options)

    def in_process_rate() -> float:
        started = time.perf_counter()
        extract_descriptors(net, ImageFiles(paths, conf.width, exif_transpose=True), options)
        return len(paths) / (time.perf_counter() - started)

    # The paths take turns, round after round (this machine's speed drifts by a fifth from one
    # minute to the next): in-process alone, then Ray started and the stage run, then
    # in-process again with the idle Ray beside it (its daemons share the cores).
    alone: list[float] = []
    beside: list[float] = []
    on_ray: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i, path in enumerate(paths):
            (folder / f"{i:04d}{path.suffix}").symlink_to(path.resolve())
        for round_ in range(conf.rounds):
            alone.append(in_process_rate())
            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
            try:
                images = run_ingest(IngestConf(source=str(folder), output=f"{tmp}/r{round_}"))
                warm = ExtractConf.from_flags(
                    images=images, output=f"{tmp}/warm{round_}", max_size=64
                )
                run_extract(warm)  # workers started, the network's files in the page cache
                stage = ExtractConf.from_flags(
                    images=images, output=f"{tmp}/d{round_}", max_size=conf.width
                )
                started = time.perf_counter()
                run_extract(stage)
                on_ray.append(len(paths) / (time.perf_counter() - started))
                beside.append(in_process_rate())
            finally:
                ray.shutdown()
    alone_rate, beside_rate = float(np.median(alone)), float(np.median(beside))
    on_ray_rate = float(np.median(on_ray))

    def rounds(rates: list[float]) -> str:
        return "   rounds: " + ", ".join(f"{r:.2f}" for r in rates)

    lines = [
        f"device: {platform.machine()} CPU, {cores} cores; torch {torch.__version__}; "
        f"{len(paths)} JPEG photos, longer side {conf.width}; efficientnet_lite0 + GeM, fp32; "
        f"medians of {conf.rounds} rounds",
        f"{'path':<50}{'photos/s':>10}",
        "-" * 60,
        f"{'in-process (DataLoader decoding + network)':<50}{alone_rate:>10.2f}{rounds(alone)}",
        f"{'  the same, an idle local Ray beside it':<50}{beside_rate:>10.2f}{rounds(beside)}",
        f"{'pipeline.extract on Ray Data (bytes -> Parquet)':<50}{on_ray_rate:>10.2f}"
        f"{rounds(on_ray)}",
        f"{'ratio (Ray / in-process alone)':<50}{on_ray_rate / alone_rate:>10.2f}",
        f"{'ratio (Ray / in-process beside Ray)':<50}{on_ray_rate / beside_rate:>10.2f}",
    ]
    print("\n".join(lines))
    result = {
        "in_process": alone_rate,
        "in_process_beside_ray": beside_rate,
        "ray_pipeline": on_ray_rate,
        "ratio": on_ray_rate / alone_rate,
        "ratio_beside_ray": on_ray_rate / beside_rate,
        "rounds": {"in_process": alone, "in_process_beside_ray": beside, "ray_pipeline": on_ray},
    }
    write_results(conf.out, {"lines": lines, **result}, lines)
    return result


def _photo_files(root: Path, count: int) -> list[Path]:
    """``count`` real photos spread over the scenes, or synthetic JPEGs when there are none."""
    found = sorted(root.glob("*/*.jpg")) if root.is_dir() else []
    if found:
        step = max(1, len(found) // count)
        return found[::step][:count]
    folder = Path(tempfile.mkdtemp(prefix="bench-photos-"))
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(path)
        out.append(path)
    return out


if __name__ == "__main__":
    parsed = tyro.cli(BenchConf)
    pipeline_main(parsed) if parsed.pipeline else main(parsed)
