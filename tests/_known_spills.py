"""Register spills the offline compile gate (tests/_triton_gate.py) tolerates, per compiled variant:
kernel -> {"why": reason, "variants": {"sm_CC dtype spec constexprs num_warps": max spill bytes}}. Any
variant not listed must not spill, and a listed one not more than its bytes (ptxas 13 via Triton 3.9).
Measured over every variant (VKERN_GATE_STRIDE=1 at sm_90 and at sm_80). Removed this session:
vatp._gather_kernel (32 B, sm_80, 128 columns: now 8 warps, 166 registers); earlier: the vatp row-stats /
colsum float32 spills at D >= 128 (0.4-12 KB, D now chunked), the loki rotate at D = 256 (2.4-4.2 KB) and
the vatp colsum 16-bit D = 128 and select spills."""

KNOWN_SPILLS = {
    "loki._attend_kernel": dict(
        why=("4-16 B at 72-128 registers (the limit is 255), sm_80 except one sm_90 variant: not a register "
             "tile that overflows. All but two are float32 with D_PAD = 128 and the JIT's 16-divisible sizes; "
             "two are 16-bit dense D = 64. Left: the cause inside ptxas's allocation was not pinned down, and "
             "a tile or warp change would need GPU timings to show it costs nothing (none this session)."),
        variants={
            "sm_80 fp32 div16 BLOCK_N=32 DENSE=True D_PAD=128 HEADS_PER_LIST=1 NSPLIT=1 num_warps=4": 16,
            "sm_80 fp32 div16 BLOCK_N=32 DENSE=True D_PAD=256 HEADS_PER_LIST=1 NSPLIT=1 num_warps=4": 16,
            "sm_80 bf16 plain BLOCK_N=32 DENSE=True D_PAD=64 HEADS_PER_LIST=1 NSPLIT=1 num_warps=4": 4,
            "sm_80 fp16 plain BLOCK_N=32 DENSE=True D_PAD=64 HEADS_PER_LIST=1 NSPLIT=1 num_warps=4": 4,
            "sm_80 fp32 div16 BLOCK_N=32 DENSE=False D_PAD=128 HEADS_PER_LIST=1 NSPLIT=2 num_warps=4": 4,
            "sm_80 fp32 div16 BLOCK_N=32 DENSE=False D_PAD=128 HEADS_PER_LIST=1 NSPLIT=32 num_warps=4": 4,
            "sm_80 fp32 div16 BLOCK_N=32 DENSE=False D_PAD=128 HEADS_PER_LIST=2 NSPLIT=2 num_warps=4": 4,
            "sm_80 fp32 div16 BLOCK_N=32 DENSE=False D_PAD=128 HEADS_PER_LIST=2 NSPLIT=32 num_warps=4": 4,
            "sm_80 fp32 div16 BLOCK_N=32 DENSE=False D_PAD=128 HEADS_PER_LIST=4 NSPLIT=2 num_warps=4": 4,
            "sm_80 fp32 div16 BLOCK_N=32 DENSE=False D_PAD=128 HEADS_PER_LIST=4 NSPLIT=32 num_warps=4": 4,
            "sm_80 fp32 div16 BLOCK_N=32 DENSE=False D_PAD=128 HEADS_PER_LIST=8 NSPLIT=2 num_warps=4": 4,
            "sm_80 fp32 div16 BLOCK_N=32 DENSE=False D_PAD=128 HEADS_PER_LIST=8 NSPLIT=32 num_warps=4": 4,
            "sm_90 fp32 div16 BLOCK_N=32 DENSE=True D_PAD=128 HEADS_PER_LIST=1 NSPLIT=1 num_warps=4": 4,
        }),
    "vatp._colsum_kernel": dict(
        why=("4-12 B at 72-168 registers, sm_90 only: float32 D-chunked tiles (BLOCK_M 16, 8 warps) and "
             "whole-D 16-bit tiles; they came back when the per-row non-finite rule (docs/contracts.md) joined "
             "the chunked tiles (up to 8,440 B before the chunking). Far under the register limit: ptxas's "
             "allocation, not a tile. Tried (offline, all four arch x spec combinations): float32 at 4 warps "
             "spills 20-40 B at sm_90 plain (255 registers), float32 D_CHUNK 32 moves 8 B to sm_80 div16 "
             "causal, 16-bit D = 256 at 8 warps moves 16 B to sm_90 plain; so the launcher's tiles stay."),
        variants={
            "sm_90 fp32 div16 BLOCK_D=128 BLOCK_M=16 BLOCK_N=32 CAUSAL=False D_CHUNK=64 PRECISION=ieee UPCAST=False num_warps=8": 12,
            "sm_90 fp32 div16 BLOCK_D=256 BLOCK_M=16 BLOCK_N=32 CAUSAL=False D_CHUNK=64 PRECISION=ieee UPCAST=False num_warps=8": 12,
            "sm_90 bf16 div16 BLOCK_D=256 BLOCK_M=32 BLOCK_N=32 CAUSAL=False D_CHUNK=256 PRECISION=tf32 UPCAST=False num_warps=4": 8,
            "sm_90 bf16 plain BLOCK_D=64 BLOCK_M=32 BLOCK_N=32 CAUSAL=True D_CHUNK=64 PRECISION=tf32 UPCAST=False num_warps=4": 8,
            "sm_90 fp16 div16 BLOCK_D=256 BLOCK_M=32 BLOCK_N=32 CAUSAL=False D_CHUNK=256 PRECISION=tf32 UPCAST=False num_warps=4": 8,
            "sm_90 fp16 plain BLOCK_D=64 BLOCK_M=32 BLOCK_N=32 CAUSAL=True D_CHUNK=64 PRECISION=tf32 UPCAST=False num_warps=4": 8,
            "sm_90 fp32 div16 BLOCK_D=64 BLOCK_M=32 BLOCK_N=32 CAUSAL=False D_CHUNK=64 PRECISION=ieee UPCAST=False num_warps=4": 4,
        }),
    "taskvec._apply_kernel": dict(
        why=("4-16 B at 96-128 registers: the per-task dequantize loop keeps codes, scales and zero points of "
             "a [16, 64] tile live with the float32 accumulator (and the TIES election's sums for METHOD = 1). "
             "Left: a smaller tile would mean more passes over the base; not timed without a GPU."),
        variants={
            "sm_80 fp32 div16 BLOCK_K=64 BLOCK_N=16 METHOD=1 TRIM=True num_warps=4": 16,
            "sm_80 fp32 div16 BLOCK_K=64 BLOCK_N=16 METHOD=1 TRIM=False num_warps=4": 4,
            "sm_90 bf16 plain BLOCK_K=64 BLOCK_N=16 METHOD=0 TRIM=False num_warps=4": 4,
            "sm_90 bf16 plain BLOCK_K=64 BLOCK_N=16 METHOD=1 TRIM=False num_warps=4": 4,
            "sm_90 fp16 plain BLOCK_K=64 BLOCK_N=16 METHOD=0 TRIM=False num_warps=4": 4,
            "sm_90 fp16 plain BLOCK_K=64 BLOCK_N=16 METHOD=1 TRIM=False num_warps=4": 4,
            "sm_90 fp32 plain BLOCK_K=64 BLOCK_N=16 METHOD=0 TRIM=False num_warps=4": 4,
            "sm_90 fp32 plain BLOCK_K=64 BLOCK_N=16 METHOD=0 TRIM=True num_warps=4": 4,
            "sm_90 fp32 plain BLOCK_K=64 BLOCK_N=16 METHOD=1 TRIM=False num_warps=4": 4,
        }),
    "taskvec._delta_kernel": dict(
        why=("4-72 B at 96-128 registers: the per-row task ids (MERGED = False) keep a task start and "
             "coefficient per row live across the K loop beside the dot accumulator; 4 B in two merged 16-bit "
             "variants. Left: needs GPU timings to pick a smaller tile."),
        variants={
            "sm_80 bf16 plain BLOCK_K=32 BLOCK_M=16 BLOCK_N=32 MERGED=False num_warps=4": 72,
            "sm_80 fp16 plain BLOCK_K=32 BLOCK_M=16 BLOCK_N=32 MERGED=False num_warps=4": 72,
            "sm_80 fp32 plain BLOCK_K=32 BLOCK_M=16 BLOCK_N=32 MERGED=False num_warps=4": 72,
            "sm_90 fp32 div16 BLOCK_K=32 BLOCK_M=16 BLOCK_N=32 MERGED=False num_warps=4": 52,
            "sm_80 fp32 div16 BLOCK_K=32 BLOCK_M=16 BLOCK_N=32 MERGED=False num_warps=4": 32,
            "sm_90 bf16 div16 BLOCK_K=32 BLOCK_M=16 BLOCK_N=32 MERGED=True num_warps=4": 4,
            "sm_90 fp16 div16 BLOCK_K=32 BLOCK_M=16 BLOCK_N=32 MERGED=True num_warps=4": 4,
        }),
    "maxsim._maxsim_kernel": dict(
        why=("4-260 B: float32 IEEE-dot configs (operands in registers) with 64-128 query rows, and 16-bit D = "
             "256 configs with 64 rows at sm_80 (kernels/maxsim.py, _TILES). The tiles were chosen without a "
             "GPU to time them; shrinking them trades spills for more passes over the documents, which only a "
             "GPU run can weigh."),
        variants={
            "sm_80 bf16 plain BLOCK_D=256 BLOCK_Q=1 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=64 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 260,
            "sm_80 fp16 plain BLOCK_D=256 BLOCK_Q=1 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=64 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 260,
            "sm_80 fp32 plain BLOCK_D=32 BLOCK_Q=1 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=64 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 92,
            "sm_90 fp32 plain BLOCK_D=32 BLOCK_Q=32 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=2 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 64,
            "sm_90 fp32 plain BLOCK_D=32 BLOCK_Q=1 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=64 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 60,
            "sm_80 fp32 div16 BLOCK_D=32 BLOCK_Q=1 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=64 SINGLE_D_BLOCK=False UPCAST_TO_FP32=False num_warps=8": 56,
            "sm_90 fp32 plain BLOCK_D=32 BLOCK_Q=8 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 56,
            "sm_90 fp32 div16 BLOCK_D=32 BLOCK_Q=1 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=64 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 40,
            "sm_80 fp32 div16 BLOCK_D=32 BLOCK_Q=32 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=2 SINGLE_D_BLOCK=False UPCAST_TO_FP32=False num_warps=8": 24,
            "sm_90 bf16 plain BLOCK_D=256 BLOCK_Q=2 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 24,
            "sm_90 fp16 plain BLOCK_D=256 BLOCK_Q=2 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 24,
            "sm_80 bf16 plain BLOCK_D=256 BLOCK_Q=8 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=2 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 20,
            "sm_80 fp16 plain BLOCK_D=256 BLOCK_Q=8 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=2 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 20,
            "sm_80 fp32 div16 BLOCK_D=32 BLOCK_Q=8 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=False UPCAST_TO_FP32=False num_warps=8": 16,
            "sm_80 fp32 plain BLOCK_D=32 BLOCK_Q=8 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 16,
            "sm_90 fp32 plain BLOCK_D=32 BLOCK_Q=64 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=1 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 16,
            "sm_80 bf16 plain BLOCK_D=128 BLOCK_Q=32 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=1 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 12,
            "sm_80 fp16 plain BLOCK_D=128 BLOCK_Q=32 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=1 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 12,
            "sm_80 fp32 div16 BLOCK_D=32 BLOCK_Q=1 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=64 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 12,
            "sm_80 fp32 div16 BLOCK_D=32 BLOCK_Q=64 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=1 SINGLE_D_BLOCK=False UPCAST_TO_FP32=False num_warps=8": 12,
            "sm_80 fp32 plain BLOCK_D=32 BLOCK_Q=1 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=64 SINGLE_D_BLOCK=False UPCAST_TO_FP32=False num_warps=8": 12,
            "sm_80 fp32 plain BLOCK_D=32 BLOCK_Q=64 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=1 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 12,
            "sm_90 bf16 plain BLOCK_D=256 BLOCK_Q=1 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=64 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 8,
            "sm_90 fp16 plain BLOCK_D=256 BLOCK_Q=1 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=64 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 8,
            "sm_90 fp32 plain BLOCK_D=32 BLOCK_Q=16 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=1 SINGLE_D_BLOCK=False UPCAST_TO_FP32=False num_warps=4": 8,
            "sm_90 fp32 plain BLOCK_D=32 BLOCK_Q=16 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=1 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=4": 8,
            "sm_90 fp32 plain BLOCK_D=32 BLOCK_Q=2 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=False UPCAST_TO_FP32=False num_warps=4": 8,
            "sm_90 fp32 plain BLOCK_D=32 BLOCK_Q=8 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=2 SINGLE_D_BLOCK=False UPCAST_TO_FP32=False num_warps=4": 8,
            "sm_80 bf16 div16 BLOCK_D=256 BLOCK_Q=32 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=2 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 4,
            "sm_80 bf16 div16 BLOCK_D=256 BLOCK_Q=64 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=1 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 4,
            "sm_80 bf16 div16 BLOCK_D=64 BLOCK_Q=8 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=2 SINGLE_D_BLOCK=False UPCAST_TO_FP32=False num_warps=4": 4,
            "sm_80 bf16 plain BLOCK_D=128 BLOCK_Q=8 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 4,
            "sm_80 bf16 plain BLOCK_D=256 BLOCK_Q=2 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 4,
            "sm_80 bf16 plain BLOCK_D=64 BLOCK_Q=2 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=4": 4,
            "sm_80 fp16 div16 BLOCK_D=256 BLOCK_Q=32 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=2 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 4,
            "sm_80 fp16 div16 BLOCK_D=256 BLOCK_Q=64 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=1 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 4,
            "sm_80 fp16 div16 BLOCK_D=64 BLOCK_Q=8 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=2 SINGLE_D_BLOCK=False UPCAST_TO_FP32=False num_warps=4": 4,
            "sm_80 fp16 plain BLOCK_D=128 BLOCK_Q=8 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 4,
            "sm_80 fp16 plain BLOCK_D=256 BLOCK_Q=2 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 4,
            "sm_80 fp16 plain BLOCK_D=64 BLOCK_Q=2 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=4": 4,
            "sm_80 fp32 div16 BLOCK_D=32 BLOCK_Q=32 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=1 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 4,
            "sm_80 fp32 plain BLOCK_D=32 BLOCK_Q=32 BLOCK_T=64 INPUT_PRECISION=ieee NAN_BY_FLAG=False QUERIES_PER_PROGRAM=2 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=8": 4,
            "sm_90 bf16 div16 BLOCK_D=64 BLOCK_Q=2 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=False UPCAST_TO_FP32=False num_warps=4": 4,
            "sm_90 bf16 plain BLOCK_D=128 BLOCK_Q=2 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=4": 4,
            "sm_90 fp16 div16 BLOCK_D=64 BLOCK_Q=2 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=False UPCAST_TO_FP32=False num_warps=4": 4,
            "sm_90 fp16 plain BLOCK_D=128 BLOCK_Q=2 BLOCK_T=64 INPUT_PRECISION=tf32 NAN_BY_FLAG=False QUERIES_PER_PROGRAM=8 SINGLE_D_BLOCK=True UPCAST_TO_FP32=False num_warps=4": 4,
        }),
}
