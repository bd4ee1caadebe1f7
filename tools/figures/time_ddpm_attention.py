"""ddpm.Attention's forward + backward with the layout it hands scaled_dot_product_attention (q, k, v as
contiguous positions x channels rows) beside the transposed views it used before, at the small U-Net's
attention level (batch 128, 16 x 16, 64 channels), in fp32 and bf16, on this machine.

    python tools/figures/time_ddpm_attention.py
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import ddpm  # noqa: E402


def transposed(att, x):   # the earlier forward: q, k, v as transposed (non-contiguous) views
    B, C, H, W = x.shape
    q, k, v = att.qkv(att.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)
    return x + att.out(F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W))


def seconds(f, x, repeats=10):
    for _ in range(2):
        f(x).sum().backward()
    t = time.perf_counter()
    for _ in range(repeats):
        f(x).sum().backward()
    return (time.perf_counter() - t) / repeats


def main():
    torch.manual_seed(0)
    att = ddpm.Attention(64)
    torch.nn.init.normal_(att.out.weight)   # not the zero init: the output depends on the attention
    x = torch.randn(128, 64, 16, 16, requires_grad=True)
    torch.testing.assert_close(att(x), transposed(att, x))
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            now, before = seconds(att, x), seconds(lambda v: transposed(att, v), x)
        print(f"{str(dtype):15s} contiguous rows {now * 1e3:7.1f} ms, transposed views {before * 1e3:7.1f} ms: "
              f"{before / now:.2f}x")


if __name__ == "__main__":
    main()
