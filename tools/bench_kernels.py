"""Each CUDA kernel against the PyTorch path on OPT-13B and OPT-30B block shapes: time per call,
speed-up, peak device memory of the call, and agreement (bit-exact / share of equal clip picks).
Needs a CUDA device; the kernels are built on first use (streamq/kernels.py).

    python tools/bench_kernels.py                  # fp16, INT4, group 128, 512 clip tokens
    python tools/bench_kernels.py --shapes opt-30b --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from streamq import kernels
from streamq.config import QuantConfig
from streamq.formats.awq import pack_linear
from streamq.quant import quant_params, quantize

# (hidden, ffn) and the linears of one block: name -> (out, in)
SHAPES = {"opt-13b": (5120, 20480), "opt-30b": (7168, 28672)}


def linears(hidden: int, ffn: int) -> dict[str, tuple[int, int]]:
    return {"q/k/v/out_proj": (hidden, hidden), "fc1": (ffn, hidden), "fc2": (hidden, ffn)}


def timed(fn, repeats: int) -> tuple[float, int, object]:
    """Median seconds per call and the peak device memory one call adds over what was allocated."""
    result = fn()  # warm-up (and the result to compare)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() - base
    return sorted(times)[len(times) // 2], peak, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--w-bit", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--clip-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels needs a CUDA device")
    dev = torch.device("cuda")
    t0 = time.time()
    ext = kernels.build()
    print(f"kernels built/loaded in {time.time() - t0:.1f} s", flush=True)
    cuda, ref = kernels.cuda_ops(ext), kernels.TORCH
    qcfg = QuantConfig(w_bit=args.w_bit, group_size=args.group_size, clip_tokens=args.clip_tokens)
    rows = []
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        for name, (out_f, in_f) in linears(*SHAPES[shape]).items():
            w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(dev, torch.float16)
            s = (torch.rand(in_f, generator=g) + 0.5).to(dev, torch.float16)
            x = torch.randn(args.clip_tokens, in_f, generator=g).to(dev, torch.float16)
            sc, zc = quant_params(w, args.w_bit, args.group_size)
            packed = {k: v.to(dev) for k, v in pack_linear(quantize(w, sc, zc, args.w_bit), sc, zc).items()}
            cases = [
                ("scaled pseudo-quantize", lambda o: o.scaled_pseudo_quantize(w, s, qcfg), "bit-exact"),
                ("clip search", lambda o: o.search_clip(w, x, qcfg), "picks"),
                ("dequantize GEMM", lambda o: o.dequantize_gemm(packed["qweight"], packed["qzeros"], packed["scales"]),
                 "bit-exact"),
            ]
            for kernel, call, check in cases:
                t_ref, m_ref, r_ref = timed(lambda: call(ref), args.repeats)
                t_cu, m_cu, r_cu = timed(lambda: call(cuda), args.repeats)
                if check == "bit-exact":
                    agree = "bit-exact" if torch.equal(r_ref, r_cu) else "DIFFERS"
                else:
                    agree = f"{(r_ref == r_cu).float().mean():.2%} equal"
                rows.append((shape, name, f"{out_f}x{in_f}", kernel, t_ref, t_cu, m_ref, m_cu, agree))
                print(f"{shape} {name} {kernel}: torch {t_ref * 1e3:.1f} ms, cuda {t_cu * 1e3:.1f} ms", flush=True)
    print(f"\ndevice: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"fp16 weights, INT{args.w_bit}, group {args.group_size}, {args.clip_tokens} clip tokens, "
          f"median of {args.repeats}")
    print("| shape | linear | out x in | kernel | torch ms | cuda ms | speed-up | torch peak MiB | cuda peak MiB "
          "| agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape, name, dims, kernel, t_ref, t_cu, m_ref, m_cu, agree in rows:
        print(f"| {shape} | {name} | {dims} | {kernel} | {t_ref * 1e3:.1f} | {t_cu * 1e3:.1f} | {t_ref / t_cu:.1f}x "
              f"| {m_ref / 2**20:.0f} | {m_cu / 2**20:.0f} | {agree} |")


if __name__ == "__main__":
    main()
