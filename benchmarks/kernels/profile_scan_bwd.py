""" One call of the Triton scan backward at ARM-B's training shape, for a kernel profiler:

    ncu --kernel-name regex:_scan_bwd --launch-count 1 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats python benchmarks/profile_scan_bwd.py
"""
import torch
from scan_kernels import SHAPES, token_inputs

from timm_arm.ops import triton_scan as ts


def main():
    t, order = token_inputs(*SHAPES[0])
    t = {k: v.detach() for k, v in t.items()}
    cfg = ts.scan_config(t['u'].shape[-1], t['u'].shape[2], t['A'].shape[-1])
    args = (t['u'], t['delta'], t['A'].contiguous(), t['B'], t['C'], t['D'], t['delta_bias'], True,
            order[0].to(torch.int32))
    dy = torch.randn_like(t['u'])
    for _ in range(2):
        ts._scan_backward(dy, *args, cfg)
    torch.cuda.synchronize()
    k = ts._last_kernels['scan_bwd']
    print(f'config {cfg}, registers {k.n_regs}, spills {k.n_spills}')


if __name__ == '__main__':
    main()
