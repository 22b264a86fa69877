"""What this machine's matrix products reach, per dtype, at a shape the search multiplies:
multiply-adds per second of x [m, k] by w [n, k]^T, the median of a few repeats. On a CPU it says
whether bfloat16 pays (AMX: several times float32) and what float32's ceiling is.

    python tools/bench_matmul.py                      # SmolLM2's MLP at 8 x 256 tokens, on the CPU
    python tools/bench_matmul.py --m 65536 --k 7168 --n 28672 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=2048, help="tokens")
    parser.add_argument("--k", type=int, default=576, help="input width")
    parser.add_argument("--n", type=int, default=1536, help="output width")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"| dtype | ms | GMAC/s |\n|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(args.m, args.k, device=device, dtype=dtype)
        w = torch.randn(args.n, args.k, device=device, dtype=dtype)
        times = []
        for i in range(args.repeats + 2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            x @ w.t()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:  # the first two warm up
                times.append(time.perf_counter() - t)
        s = statistics.median(times)
        print(f"| {str(dtype).replace('torch.', '')} | {s * 1e3:.2f} | {args.m * args.k * args.n / s / 1e9:.0f} |")
    print(f"\n[{args.m}, {args.k}] x [{args.k}, {args.n}], median of {args.repeats}; {name}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")


if __name__ == "__main__":
    main()
