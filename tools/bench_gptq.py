"""GPTQ of one block's linears that share a Hessian (q/k/v, gate/up), one at a time against
stacked through one column loop (gptq_quantize's parts), at a model's widths: seconds and
whether the codes are identical. Random weights; the Hessian of random inputs with salient channels.

    python tools/bench_gptq.py --shape smollm2 --device cpu
    python tools/bench_gptq.py --shape llama-2-7b --device cuda
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from streamq.gptq import gptq_quantize

# name -> (hidden, ffn, key/value width): q, k, v read hidden; gate, up read hidden
SHAPES = {"smollm2": (576, 1536, 192), "gemma-3-270m": (640, 2048, 256), "llama-2-7b": (4096, 11008, 4096),
          "llama-3-70b": (8192, 28672, 1024)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    hidden, ffn, kv = SHAPES[args.shape]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.tokens, hidden, generator=g, device=device)
    x[:, :8] *= 20
    h = x.t() @ x
    gs = 128 if hidden % 128 == 0 else 64  # SmolLM2's 576
    sets = {"q/k/v": [hidden, kv, kv], "gate/up": [ffn, ffn]}
    print("| set | rows | one at a time s | stacked s | speed-up | identical |")
    print("|---|---|---|---|---|---|")
    for label, heights in sets.items():
        weights = [torch.randn(rows, hidden, generator=g, device=device) * 0.02 for rows in heights]
        times = {"alone": [], "stacked": []}
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            alone = [gptq_quantize(w.clone(), h, 4, gs, act_order=True) for w in weights]
            sync(device)
            t1 = time.perf_counter()
            stacked = gptq_quantize(torch.cat(weights), h, 4, gs, act_order=True, parts=heights)
            sync(device)
            times["alone"].append(t1 - t0)
            times["stacked"].append(time.perf_counter() - t1)
        same = all(torch.equal(torch.cat([a[i] for a in alone]), stacked[i]) for i in range(3))
        a, s = min(times["alone"]), min(times["stacked"])
        print(f"| {label} | {' + '.join(map(str, heights))} x {hidden} | {a:.2f} | {s:.2f} | {a / s:.2f}x | {same} |")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(f"\n{args.shape} widths, INT4 g{gs} act-order, best of {args.repeats}; {name}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")


if __name__ == "__main__":
    main()
