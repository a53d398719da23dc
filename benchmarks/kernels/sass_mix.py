""" Instruction mix of the Triton scan kernels, compiled for sm_90 on any machine (no GPU needed):

    python benchmarks/kernels/sass_mix.py [--kernel scan_bwd|scan_fwd] [--block-d 16] [--T 2] [--M 4]
                                          [--max-registers 176] [--states] [--butterfly] [--a-log]

Builds the kernel as the model calls it at ARM's shapes (bf16 activations, scan orders, softplus, D, delta bias),
disassembles it with the cuobjdump that ships with Triton, and prints registers, stack (spill) bytes, layout
conversions in the TTGIR and, for every loop, its instruction count by opcode (loops nest: an outer loop's count
includes its inner loops). The chunk loop of the backward is
the longest; its count per thread, divided by the state elements a thread holds per chunk (T x N x BLOCK_D / 32),
tracked the measured time closely on an H200 (benchmarks/RESULTS.md) until the kernels became latency-bound:
fewer instructions now help less than hiding load latency does. The build has none of the runtime's
divisibility specialisation (16-byte aligned pointers, strides divisible by 16), so loads the JIT would
vectorise count here as scalar ones. Relies on Triton's compiler internals (ASTSource, GPUTarget); written
against triton 3.6 - 3.8.
"""
import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from timm_arm.ops.triton import scan as triton_scan
from timm_arm.ops.triton import scan_backward as triton_scan_backward

_BF16_ARGS = {'u_ptr', 'dt_ptr', 'B_ptr', 'C_ptr', 'dy_ptr', 'du_ptr', 'ddt_ptr', 'y_ptr'}


def compile_sm90(fn, constants, num_warps, max_registers=None):
    """The kernel's signature with bf16 activations, int32 orders, fp32 parameters / scratch, i32 scalars."""
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = 'constexpr'
        elif name.endswith('_ptr'):
            signature[name] = '*bf16' if name in _BF16_ARGS else '*i32' if name == 'order_ptr' else '*fp32'
        else:
            signature[name] = 'i32'
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    options = dict(num_warps=num_warps, **({'maxnreg': max_registers} if max_registers else {}))
    return triton.compile(source, target=GPUTarget('cuda', 90, 32), options=options)


def instruction_mix(cubin: bytes):
    """(registers, stack bytes, [(loop start, loop end, Counter of opcodes)]) from the SASS of a cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, '-sass', f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, '-res-usage', f.name], capture_output=True, text=True, check=True).stdout
    code = []
    for line in sass.splitlines():
        m = re.match(r'\s+/\*([0-9a-f]{4,6})\*/\s+(.*?);', line)
        if m:
            code.append((int(m.group(1), 16), m.group(2).strip()))
    index = {address: i for i, (address, _) in enumerate(code)}
    loops = []
    for i, (address, text) in enumerate(code):
        branch = re.search(r'BRA (?:`\(.*?\) )?0x([0-9a-f]+)', text)
        if branch and int(branch.group(1), 16) < address and int(branch.group(1), 16) in index:
            body = code[index[int(branch.group(1), 16)]:i + 1]
            ops = collections.Counter(re.match(r'(?:@!?U?P\w+\s+)?([A-Z0-9_]+)', t).group(1) for _, t in body)
            loops.append((int(branch.group(1), 16), address, ops))
    registers = int(re.search(r'REG:(\d+)', usage).group(1))
    stack = int(re.search(r'STACK:(\d+)', usage).group(1))
    return registers, stack, loops


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--kernel', default='scan_bwd', choices=('scan_bwd', 'scan_fwd'))
    default = triton_scan.scan_config(768, 197, 16)
    parser.add_argument('--block-d', type=int, default=None)
    parser.add_argument('--T', type=int, default=None)
    parser.add_argument('--M', type=int, default=default.chunks_per_segment)
    parser.add_argument('--max-registers', type=int, default=default.max_registers_bwd)
    parser.add_argument('--warps', type=int, default=1)
    parser.add_argument('--states', action='store_true', help='scan_bwd: segment states given (no first pass)')
    parser.add_argument('--butterfly', action='store_true', help='scan_bwd: channel sums as tl.sum (butterfly)')
    parser.add_argument('--a-log', action='store_true', help='scan_fwd: A given as A_log (as the mixer passes it)')
    args = parser.parse_args()
    flags = dict(NP=16, HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, HAS_ORDER=True)
    if args.kernel == 'scan_bwd':
        block_d, T = args.block_d or default.block_d_bwd, args.T or default.T_bwd
        cfg = default._replace(T_bwd=T, block_d_bwd=block_d, warps_bwd=args.warps)
        scatter = triton_scan_backward._lane_tile(cfg, 16) and not args.butterfly
        constants = dict(flags, BLOCK_D=block_d, T=T, M=args.M, LANE_TILE=scatter, HAS_STATES=args.states,
                         ATOMIC=True)
        kernel = compile_sm90(triton_scan_backward._scan_bwd_kernel, constants, args.warps, args.max_registers)
    else:
        block_d, T = args.block_d or default.block_d_fwd, args.T or default.T
        kernel = compile_sm90(triton_scan._scan_fwd_kernel, dict(flags, BLOCK_D=block_d, T=T, SEGMENT_CHUNKS=0,
                                                           A_IS_LOG=args.a_log), args.warps)
    registers, stack, loops = instruction_mix(kernel.asm['cubin'])
    per_thread = T * 16 * block_d // (32 * args.warps)
    print(f'{args.kernel}: T {T}, BLOCK_D {block_d}, warps {args.warps}: {registers} registers, {stack} B stack, '
          f'{kernel.asm["ttgir"].count("ttg.convert_layout")} layout conversions, {per_thread} state elements '
          f'per thread per chunk')
    for start, end, ops in loops:
        total = sum(ops.values())
        print(f'  loop {start:#x}-{end:#x}: {total} instructions ({total / per_thread:.1f} per element) | '
              + ' '.join(f'{op} {n}' for op, n in ops.most_common(12)))


if __name__ == '__main__':
    main()
