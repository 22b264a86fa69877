"""One block's quantization under torch.profiler: where its time goes op by op, beside the
phases streamq.json records. Builds block 0 of a model (a folder: e.g. one written by
tools/make_wide_model.py at real widths), feeds it random hidden states of the calibration shape,
plans and runs it as the engine does (chunks, forward passes, kernels, device budget), prints the
phases and the profiler's top operators by self time, and writes a Chrome trace
(chrome://tracing, ui.perfetto.dev).

    python tools/make_wide_model.py --family llama --hidden 4096 --ffn 11008 --heads 32 --layers 1 --out /tmp/l7
    python tools/trace_block.py --model /tmp/l7 --device cuda --n-samples 128 --seqlen 512 --trace /tmp/l7.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from streamq.block import quantize_block
from streamq.config import CalibConfig, QuantConfig, parse_size
from streamq.families import build_block
from streamq.forecast import block_plan, device_budget
from streamq.formats import by_name, settle
from streamq.kernels import select as select_kernels
from streamq.models import compute_dtype, open_checkpoint, resolve_device
from streamq.timing import Phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--method", choices=["awq", "gptq", "awq+gptq"], default="awq")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--max-gpu-mem", help="as streamq run's (default: the device's free memory)")
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--trace", type=Path, help="write the Chrome trace here")
    args = parser.parse_args()

    reader, config, family = open_checkpoint(args.model)
    dev = resolve_device(args.device)
    dtype = compute_dtype(dev, "auto", reader.float_dtype())
    gptq = args.method != "awq"
    qcfg = settle(by_name("awq"), QuantConfig(group_size=args.group_size, gptq=gptq,
                                              mode="rtn" if args.method == "gptq" else "awq",
                                              next_input="quantized" if gptq else "fp16"), reader.float_dtype())
    calib = CalibConfig(n_samples=args.n_samples, seqlen=args.seqlen)
    budget = device_budget(dev, parse_size(args.max_gpu_mem) if args.max_gpu_mem else None)
    _, plan = block_plan(config, family, qcfg, calib, dev, dtype, budget)
    ops = select_kernels(args.kernels, dev, dtype)[0]
    block = build_block(config, 0, reader.with_prefix(family.block_prefix(0)), dev, dtype, park=plan.experts_parked)
    store = dev if plan.activations_on_device else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n_samples, args.seqlen, config.hidden_size, generator=g).to(dtype)
    chunks = [c.to(store) for c in x.split(plan.chunk_samples)]
    kwargs = family.block_kwargs(config, args.seqlen, dev, dtype, 0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    phases = Phases(dev)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        quantize_block(block, family, config, chunks, kwargs, qcfg, store, ops, plan.forward_samples,
                       where=family.block_prefix(0), phases=phases)
    seconds = time.perf_counter() - start
    print(f"{args.model.name}: block 0, {args.method}, {args.n_samples} x {args.seqlen} tokens, {dev}, {dtype}, "
          f"chunks of {plan.chunk_samples}, passes of {plan.forward_samples or 'a whole chunk'}, "
          f"kernels {ops.name}: {seconds:.2f} s under the profiler\n")
    print("| phase | s |\n|---|---|")
    for name, s in sorted(phases.seconds.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {s:.3f} |")
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print()
    print(prof.key_averages().table(sort_by=key, row_limit=args.top))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
        print(f"trace: {args.trace}")


if __name__ == "__main__":
    main()
