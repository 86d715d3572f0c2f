"""CPU bf16 convolution gradients against fp32: where torch's CPU bf16 backward is wrong.

A 3x3 stride-2 convolution (a ResNet stage's first) is run forward and backward under CPU bf16 autocast
and in fp32, on the same inputs, in both memory layouts (our encoder feeds the backbone channels-last),
for a few input sizes. Each row gives the weight gradient's largest error relative to its fp32 value's
largest entry; bf16 rounding alone gives a few 1e-3. Three tries per row, as a wrong result here is
not always the same.

    python benchmarks/cpu_bf16_conv.py
"""

from __future__ import annotations

import torch

SIZES = (1, 2, 3, 4)
CHANNELS = ((32, 64), (64, 128))
TRIES = 3


def weight_grad(x: torch.Tensor, out: torch.Tensor, conv: torch.nn.Conv2d, bf16: bool) -> torch.Tensor:
    conv.zero_grad()
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = conv(x)
    (y.float() * out).sum().backward()
    assert conv.weight.grad is not None
    return conv.weight.grad.clone()


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}: weight gradient of a 3x3 stride-2 conv, bf16 vs fp32, batch 48")
    header = f"{'in -> out channels':>18s} {'input':>7s} {'layout':>14s}"
    print(f"{header}   largest relative error, {TRIES} tries")
    for cin, cout in CHANNELS:
        for size in SIZES:
            for layout in (torch.contiguous_format, torch.channels_last):
                conv = torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False).to(memory_format=layout)
                x = torch.randn(48, cin, size, size).contiguous(memory_format=layout)
                out_size = (size + 1) // 2
                out = torch.randn(48, cout, out_size, out_size)
                reference = weight_grad(x, out, conv, bf16=False)
                errors = []
                for _ in range(TRIES):
                    error = (weight_grad(x, out, conv, bf16=True) - reference).abs().max()
                    errors.append(float(error / reference.abs().max()))
                name = "channels-last" if layout == torch.channels_last else "contiguous"
                shown = "  ".join(f"{e:9.2e}" for e in errors)
                print(f"{cin:>8d} -> {cout:<7d} {size}x{size:<5d} {name:>14s}   {shown}")


if __name__ == "__main__":
    main()
