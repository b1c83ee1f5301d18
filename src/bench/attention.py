"""The vision tower's attention alone, forward and backward, by kernel: what each path costs on the GPU.

Qwen2-VL's vision blocks (2B and 7B share the tower: 16 heads of 80) attend within each image. With every
image of a micro-batch the same size, the core can make one batched SDPA call (cuDNN on Hopper) instead of
torch's flash varlen kernel (head dim 80 padded to 96); this times both, the other SDPA backends and the
model's own one call per image, then one whole compiled attention block (qkv, rotary-free split,
attention, projection) each way. Medians of CUDA-event timings after warm-up. On a GPU:

    python -m src.bench.attention [--images 16] [--patches 1564] [--out results.json]

1564 patches is a 644x476 image (46 x 34 patches of 14 pixels), the benchmark's synthetic data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

HEADS, HEAD_DIM = 16, 80  # Qwen2-VL's vision tower (embed 1280)


def _time_ms(fn, warmup: int, repeats: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_paths(images: int, patches: int) -> dict:
    """name -> a function running one forward and backward of the attention alone."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from src.models.vision_attention import _flash_varlen, _sdpa_batched

    tokens = images * patches
    qkv = torch.randn(tokens, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(images + 1, device="cuda", dtype=torch.int32) * patches
    scale = HEAD_DIM**-0.5

    def run(attend, backends=None):
        def step():
            q, k, v = qkv.permute(1, 0, 2, 3).unbind(0)  # the model's layout: views of one qkv output
            if backends is None:
                out = attend(q, k, v)
            else:
                with sdpa_kernel(backends):
                    out = attend(q, k, v)
            out.backward(grad)
            qkv.grad = None

        return step

    def per_image(q, k, v):  # (1, heads, patches, dim) per image, as the model's own loop calls it
        parts = zip(*(t.split(patches) for t in (q, k, v)), strict=True)
        heads_first = ([t.transpose(0, 1)[None] for t in part] for part in parts)
        outs = [F.scaled_dot_product_attention(*part, scale=scale) for part in heads_first]
        return torch.cat(outs, dim=2)[0].transpose(0, 1)

    def batched(q, k, v):
        return _sdpa_batched(q, k, v, images, scale)

    return {
        "flash varlen (compiled default before)": run(lambda q, k, v: _flash_varlen(q, k, v, cu, patches)),
        "batched SDPA, torch's choice": run(batched),
        "batched SDPA, cuDNN": run(batched, [SDPBackend.CUDNN_ATTENTION]),
        "batched SDPA, flash": run(batched, [SDPBackend.FLASH_ATTENTION]),
        "batched SDPA, memory-efficient": run(batched, [SDPBackend.EFFICIENT_ATTENTION]),
        "SDPA per image, cuDNN (the model's own)": run(per_image, [SDPBackend.CUDNN_ATTENTION]),
    }


def compiled_blocks(images: int, patches: int) -> dict:
    """A compiled attention block (qkv projection, split, attention, output projection), each way."""
    import torch

    from src.models.vision_attention import varlen_vision_attention

    width = HEADS * HEAD_DIM
    x = torch.randn(images * patches, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    qkv = torch.nn.Linear(width, 3 * width, device="cuda", dtype=torch.bfloat16)
    proj = torch.nn.Linear(width, width, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(images + 1, device="cuda", dtype=torch.int32) * patches

    def block(hidden, batch_equal_images):
        q, k, v = qkv(hidden).reshape(hidden.shape[0], 3, HEADS, -1).permute(1, 0, 2, 3).unbind(0)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out, _ = varlen_vision_attention(
            None, q, k, v, cu_seq_lens_q=cu, max_length_q=patches, batch_equal_images=batch_equal_images
        )
        return proj(out[0].reshape(hidden.shape[0], -1))

    def run(batch_equal_images):
        compiled = torch.compile(block, dynamic=True)

        def step():
            compiled(x, batch_equal_images).sum().backward()
            x.grad = None

        return step

    return {"compiled block, varlen": run(False), "compiled block, batched": run(True)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=16, help="images a micro-batch (default 16)")
    parser.add_argument("--patches", type=int, default=1564, help="patches an image (default 1564)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls after 5 warm-up ones")
    parser.add_argument("--out", help="also write the timings here as JSON")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("src.bench.attention times CUDA kernels: run it on a GPU machine", file=sys.stderr)
        return 2
    results = {}
    paths = {**kernel_paths(args.images, args.patches), **compiled_blocks(args.images, args.patches)}
    shape = f"{args.images} images x {args.patches} patches, {HEADS} heads of {HEAD_DIM}"
    print(f"{torch.cuda.get_device_name()}, {shape}")
    print("| path | forward + backward ms |\n| --- | --- |")
    for name, step in paths.items():
        try:
            results[name] = round(_time_ms(step, 5, args.repeats), 3)
        except RuntimeError as error:  # a backend that refuses these shapes says so, the others still run
            results[name] = f"refused: {str(error).splitlines()[0][:120]}"
        print(f"| {name} | {results[name]} |", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"images": args.images, "patches": args.patches, "ms": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
