"""Batch inference throughput (images/s) per architecture and batch size, and the GFLOP/s it achieves
against this machine's measured float32 matmul peak.

    .venv/bin/python benchmarks/inference_throughput.py [--batches 1 4 16 32] [--repeats 5]

The models are the shipped architectures at 224 px (random weights: speed does not depend on them), run
the way `Predictor.predict_tensor` runs them (inference mode), in the default memory layout and in
channels-last. FLOPs per image are counted by torch.utils.flop_counter (2 per multiply-add). The peak is
the best of square float32 matmuls from 512 to 4096 on the same threads.
"""

from __future__ import annotations

import argparse

import torch
from _common import machine, median_time, table
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from medai.models import create_model

ARCHS = {"densenet121": {}, "hybrid_cnn_transformer": {"image_size": 224}, "vit_small": {"image_size": 224}}
SIZE = 224


def matmul_peak(repeats: int) -> tuple[float, int]:
    """Best float32 GFLOP/s over square matmul sizes, and the size that reached it."""
    best = (0.0, 0)
    for n in (512, 1024, 2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        seconds = median_time(lambda: torch.mm(a, b), repeats=repeats)
        best = max(best, (2 * n**3 / seconds / 1e9, n))
    return best


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def flops_per_image(model: torch.nn.Module) -> float:
    """FLOPs of one image. Counted with autograd on: in inference mode nn.TransformerEncoderLayer takes
    its fused fast path, whose linear layers the counter cannot see (the hybrid then seems to need 1.04
    instead of 2.44 GFLOP); the CPU attention kernel is added, as the counter knows only the GPU ones."""
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops})
    with counter:
        model(torch.randn(1, 1, SIZE, SIZE))
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    peak, peak_n = matmul_peak(args.repeats)
    rows = []
    for arch, kwargs in ARCHS.items():
        model = create_model(arch, num_classes=14, **kwargs).eval()
        flops = flops_per_image(model)
        for layout in ("contiguous", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            model = model.to(memory_format=fmt)
            for batch in args.batches:
                x = torch.randn(batch, 1, SIZE, SIZE).to(memory_format=fmt)

                def run() -> None:
                    with torch.inference_mode():
                        model(x)
                seconds = median_time(run, repeats=args.repeats)
                achieved = flops * batch / seconds / 1e9
                rows.append([arch, layout, batch, batch / seconds, flops / 1e9, achieved])
    # the peak again after the models: on a shared machine one measurement can land in a slow spell, and a
    # low peak would flatter every percentage
    peak, peak_n = max((peak, peak_n), matmul_peak(args.repeats))
    rows = [[arch, layout, batch, f"{ips:.1f}", f"{gflop:.2f}", f"{achieved:.1f}", f"{100 * achieved / peak:.0f}%"]
            for arch, layout, batch, ips, gflop, achieved in rows]
    print(f"## Batch inference throughput, {SIZE} px ({machine()})\n")
    print(f"Measured float32 matmul peak: {peak:.1f} GFLOP/s (torch.mm {peak_n}x{peak_n}, the best of runs "
          "before and after the models). FLOPs counted by torch.utils.flop_counter, 2 per multiply-add, with "
          "the transformer layers' fused inference path and CPU attention included.\n")
    print(table(rows, ["architecture", "layout", "batch", "images/s", "GFLOP/image", "GFLOP/s", "of peak"]))


if __name__ == "__main__":
    main()
