"""The PyTorch side of ``conv_microbench``: forward, input and kernel gradient of each shape.

Runs in a venv with torch (not this package's): ``conv_microbench --torch_python PY`` calls

    PY benchmarks/torch_conv.py --batch 128 --reps 7 --warmup 2 --shapes '[[name, size, cin,
        cout, k, stride, padding], ...]'

and reads one JSON line per shape: {"shape", "ms": {"fwd", "dx", "dw"}} (median, float32,
torch's default threads), as torch_ref.py's models run them: NCHW, or with
``--channels_last`` in torch's channels_last memory format (as ``torch_ref.py
--channels-last``).
"""

import argparse
import json
import statistics
import time

import torch


def median_ms(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_shape(size, cin, cout, k, stride, padding, args) -> dict[str, float]:
    x = torch.randn(args.batch, cin, size, size)
    w = torch.randn(cout, cin, k, k)
    conv = torch.nn.functional.conv2d
    g = torch.randn_like(conv(x, w, stride=stride, padding=padding))
    if args.channels_last:
        x, w, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, w, g))
    passes = {
        "fwd": lambda: conv(x, w, stride=stride, padding=padding),
        "dx": lambda: torch.nn.grad.conv2d_input(x.shape, w, g, stride, padding),
        "dw": lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, stride, padding),
    }
    return {name: median_ms(fn, args.reps, args.warmup) for name, fn in passes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", required=True, help="JSON list of [name, size, cin, ...]")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--channels_last", action="store_true", help="torch.channels_last")
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, *shape in json.loads(args.shapes):
            print(json.dumps({"shape": name, "ms": time_shape(*shape, args)}), flush=True)


if __name__ == "__main__":
    main()
