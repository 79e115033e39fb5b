"""Fused Triton kernels for the implicit-field decoder: per-point cross-entropy, dL/dz, score grid.

Imports only torch and triton (a leaf of ifad_fast). Kernel, launchers, autograd.Function and
the kernel's numerical specification in plain torch (`fused_point_ref`) live side by side
(Liger-Kernel `ops/` style). docs/numerics.md states the contracts in one place.

Math (identical to `ifad_fast.model.Decoder` with weight norm folded; no dropout)
-------------------------------------------------------------------------------
Per point with voxel index (i, j, k) of a grid (X, Y, Z): p_c = -1 + 2 i_c / (S_c - 1),
γ(p)[c*2L + 2f] = sin(2^f π p_c), γ(p)[c*2L + 2f + 1] = cos(2^f π p_c)  (G = 6L values).
x = [z, γ]; h_0 = relu(W_0 x + b_0); h_l = relu(W_l in_l + b_l) with in_l = [h_{l-1}, z, γ] at
l == LI (latent_in) and h_{l-1} otherwise; logits = W_out h_{NL-1} + b_out; loss = -log_softmax[t].
z is shared by every point of a scan, so its share of layers 0 and LI is hoisted out:
c0 = W_0[:, :D] z + b_0 and cr = W_LI[:, HR:HR+D] z + b_LI are per-scan bias vectors (B, H),
computed once per step in torch (fp32); the kernel sees a G-wide layer 0 and an (HR + G)-wide
layer LI, HR = H - D - G. dL/dz = W_0z^T Σ δ_0 + W_rz^T Σ δ_LI, where δ_l are pre-activation
gradients: δ_out = softmax - onehot; δ_{l-1} = (W_l[:, h part]^T δ_l) ⊙ 1[h_{l-1} > 0].

Positional encoding
-------------------
sin/cos are separable per axis: the caller passes a table of X + Y + Z rows of 2L floats
(`ifad_fast.model.axis_encoding`, the model's own float32 ops; the backend caches one per grid
shape), and the kernel prologue gathers γ for its BLOCK_M points straight from the voxel indices (3 gathers per
point from a table of <= 3*300*20 floats that lives in L1/L2). No coordinate, γ or logit is
ever written per point. This is cheaper than sin/cos in the kernel and bit-identical to the
reference's γ (no FMA contraction or libdevice-vs-Sleef ulp differences: at 2^9 π the
argument is ~1600 rad, where 1 ulp of p moves sin by ~1e-4).

Data layout (all row-major, contiguous)
---------------------------------------
idx      (B*K, 3) int32 voxel indices, scan-major (point n of scan b at b*K + n); the
         launcher converts whatever int dtype it gets, one chunk at a time
targets  (B*K,) int32 class ids, already gathered at the points (the grid evaluator too:
         the caller gathers the uint8 class volume at its voxel list)
tab      (X+Y+Z, 2L) fp32 per-axis encoding rows; axis 1 starts at row Y0 = X, axis 2 at Z0 = X+Y
fw       (NL+1, RW, SW) operand dtype: "forward" weights, W_l^T zero padded (rows = input
         features, columns = outputs). fw[0][:G] = W_0γ^T; fw[l][:H] = W_l^T (l not LI);
         fw[LI][:HR] = W_LIh^T and fw[LI][HRP:HRP+G] = W_LIγ^T; fw[NL][:H, :C] = W_out^T.
bw       (NL+1, SW, SW) operand dtype: "backward" weights, the h part of W_l as stored (rows =
         outputs, columns = h inputs), zero padded; bw[0] unused.
bias     (B, NL+1, SW) fp32: b_l for every layer, with c0 (row 0) and cr (row LI) per scan.
loss     (B*K,) fp32 out: one float per point.
cls      (B*K,) uint8 out, only when write_cls: argmax of the logits (the restored class).
part     (P, B, 2, SW) fp32 out (zeroed): per-program partial Σ δ_0 (slot 0) and Σ δ_LI (slot 1);
         reduced in torch (deterministic, no atomics).
scratch  (P, NSLOT, BLOCK_M, SW) operand dtype: per-program scratch (see below).
Padding: every width is rounded up to BLOCK_N (HP = ⌈H⌉, HRP = ⌈HR⌉, BLOCK_N % BLOCK_K == 0);
padded weight rows/columns and biases are zero, so padded activations are relu(0) = 0 and
padded δ are 0: the inner loops need no masks. Rows past K (the last tile of a scan) compute
on γ = 0 and are masked at the loss store and zeroed in δ_out.

Per-tile scratch scheme
-----------------------
One kernel, `fused_point_kernel`; the runtime flag need_grad selects forward-only (losses) or
forward + backward-to-z (losses and Σδ) in the same launch. The grid is persistent:
P = min(#tiles, #SM × programs_per_sm) programs loop over tiles of BLOCK_M points (tile
t -> scan t // tiles_per_scan). Each program owns NSLOT slots of BLOCK_M × SW scratch: slot 0
holds γ; forward-only launches ping-pong h between slots 1 and 2 (NSLOT = 3); launches with
the gradient keep every h_l (slots 1..NL: their sign is the ReLU mask of the backward) plus
two δ slots (NSLOT = NL + 3). A layer is: for each BLOCK_N column tile of its output,
acc (BLOCK_M × BLOCK_N, fp32) = Σ over BLOCK_K chunks of tl.dot(input slot chunk, fw tile)
(+ the γ slot's dots at layers 0 and LI) + bias, relu, cast, store to the output slot;
`tl.debug_barrier()` between layers (the next layer's warps read columns other warps wrote).
The epilogue (output layer, log-softmax, target gather, cross-entropy) runs on a
BLOCK_M × CP register tile (CP = 16 ≥ C). The backward starts from δ_out = softmax - onehot in
registers, walks the layers down (δ_l chunks × bw tiles, masked by the stored h_{l-1}) and
adds the column sums of δ_0 and δ_LI (fp32, before any rounding) to the program's partials.
Nothing 316- or 10-wide per point reaches global memory except the scratch slots. Sizes on an
H100 (bf16, BLOCK_M 128, SW 512, P = 132): 52 MB forward-only (the hot input+output slots of
all programs, 34 MB, stay in the 50 MB L2) and 190 MB with the gradient (8 KB/point of h_l,
written once and read back once by the backward; what L2 cannot hold goes to HBM).

FLOPs and bytes (paper size: D=256, L=10, H=512, NL=8, LI=4, C=10)
------------------------------------------------------------------
Forward MACs per point: 60·512 + 2·512² + 512·196 + 256·512 + 3·512² + 512·10 = 1,577,984
(3.16 MFLOP). Backward to z (no weight grads, nothing below layer 0): 5·512² + 2·196·512 +
10·512 = 1,516,544 MACs (3.03 MFLOP). Forward + backward: 6.19 MFLOP per point.
Restoration, 700 steps × 16,200 points: 70.2 TFLOP; the 160³ score grid (forward): 13.0 TFLOP
(less on a dilated brain mask).
HBM per point: 12 B of indices + 4 B target + 4 B loss, plus in the gradient launch up to
2 × 8 KB of h_l when they overflow L2 (≤ 0.27 GB per step, ~80 µs of HBM time, overlapped).
L2 per point (bf16, 128 × 128 × 64 tiles): the padded weights, 3.3 MB forward + 3.2 MB
backward, are read once per 128-point tile: 50 KB/point; the activation operands are re-read
once per output column tile (HP / BLOCK_N = 4): ≈ 26 KB forward + 24 KB backward, plus ≈ 22 KB
of slot writes and mask reads: ≈ 120 KB/point, ≈ 51 FLOP per byte of L2 traffic.
Expected on an H100 SXM (untimed: no GPU here): tensor-core bound would be ~0.1 ms per step;
at ~5.5-7 TB/s of L2 bandwidth the kernel is L2-bound at roughly 250-350 TFLOP/s (25-35 % of
the 989 TFLOP/s dense bf16 peak, 30-45 % of a ~800 TFLOP/s achievable matmul peak):
~0.3-0.4 ms per restoration step, ~0.2-0.3 s for 700 steps, ~40-50 ms for the 160³ grid, plus
~10 small torch launches per step (c0/cr, zeroing the partials, reductions, the dz matmuls).
float32 (exact "ieee" dots on CUDA cores, ≤ 67 TFLOP/s peak) is ~5-10× slower.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _operand(x, ODT: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """fp32 -> operand dtype. The interpreter truncates fp32 -> bf16; GPUs round to nearest
    even: with EMULATE_RNE the rounding is done on the bits first, so both agree."""
    if EMULATE_RNE:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        x = u.to(tl.float32, bitcast=True)
    return x.to(ODT)


@triton.jit
def _tile_dot(acc, a_ptr, w_ptr, k_len, rm, rk, rn, SW: tl.constexpr, BLOCK_K: tl.constexpr,
              CDT: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc += A[rm, 0:k_len] @ W[0:k_len, rn], in chunks of BLOCK_K = len(rk) (k_len a multiple).

    A (a slot: rows are points) and W (a weight block: rows are input features) are row-major
    with row stride SW; operands are cast to CDT, products accumulated in acc's fp32.
    """
    a_p = a_ptr + (rm[:, None] * SW + rk[None, :])
    w_p = w_ptr + (rk[:, None] * SW + rn[None, :])
    for k0 in range(0, k_len, BLOCK_K):
        a = tl.load(a_p)
        w = tl.load(w_p)
        acc = tl.dot(a.to(CDT), w.to(CDT), acc, input_precision=DOT_PREC)
        a_p += BLOCK_K
        w_p += BLOCK_K * SW
    return acc


@triton.jit
def _gather_encoding(idx_ptr, tab_ptr, gamma_slot, pt, valid, rm, Y0, Z0,
                     SW: tl.constexpr, TWO_L: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                     ODT: tl.constexpr, UPCAST: tl.constexpr):
    """γ of the tile's points (rows pt), gathered from the per-axis table into the γ slot; columns
    past G and rows past K are 0. Ends with a barrier: every warp of layers 0 and LI reads γ."""
    rg = tl.arange(0, GP)
    g_axis = rg // TWO_L                         # γ column -> axis, table row offset, column
    g_off = tl.where(g_axis == 1, Y0, tl.where(g_axis == 2, Z0, 0))
    g_col = rg - g_axis * TWO_L
    gmask = valid[:, None] & (rg < G)[None, :]
    vox = tl.load(idx_ptr + (pt[:, None] * 3 + g_axis[None, :]), mask=gmask, other=0)
    gam = tl.load(tab_ptr + ((vox + g_off[None, :]) * TWO_L + g_col[None, :]), mask=gmask, other=0.0)
    tl.store(gamma_slot + (rm[:, None] * SW + rg[None, :]), _operand(gam, ODT, UPCAST))
    tl.debug_barrier()


@triton.jit
def _hidden_layers(base, fw_ptr, bias_b, need_grad, rm, rn, rk,
                   NL: tl.constexpr, LI: tl.constexpr, HP: tl.constexpr, HRP: tl.constexpr,
                   SW: tl.constexpr, RW: tl.constexpr, GP: tl.constexpr, GK: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SLOT: tl.constexpr,
                   ODT: tl.constexpr, CDT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """h_l = relu(fw[l]^T [h_{l-1}, γ at 0 and LI] + bias) for l = 0..NL-1, column tile by column
    tile, from slot to slot (with the gradient every h_l is kept: slot l + 1)."""
    rgk = tl.arange(0, GK)
    for l in range(0, NL):
        kin = tl.where(l == 0, 0, tl.where(l == LI, HRP, HP))     # h-part input width
        nout = tl.where(l == LI - 1, HRP, HP)
        # with the gradient h_{l-1} lives in slot l; without, h ping-pongs in slots 1 and 2
        in_base = base + tl.where(need_grad != 0, l, 1 + (l + 1) % 2) * SLOT
        out_base = base + tl.where(need_grad != 0, l + 1, 1 + l % 2) * SLOT
        w_base = fw_ptr + l * (RW * SW)
        wg_base = w_base + tl.where(l == 0, 0, HRP) * SW          # γ rows of fw[l]
        for n0 in range(0, nout, BLOCK_N):
            acc = tl.zeros((rm.shape[0], BLOCK_N), dtype=tl.float32)
            acc = _tile_dot(acc, in_base, w_base + n0, kin, rm, rk, rn, SW, BLOCK_K, CDT, DOT_PREC)
            if (l == 0) | (l == LI):
                acc = _tile_dot(acc, base, wg_base + n0, GP, rm, rgk, rn, SW, GK, CDT, DOT_PREC)
            acc += tl.load(bias_b + l * SW + n0 + rn)[None, :]
            hval = tl.maximum(acc, 0.0)
            tl.store(out_base + n0 + (rm[:, None] * SW + rn[None, :]), _operand(hval, ODT, UPCAST))
        tl.debug_barrier()


@triton.jit
def _tile_points(t, K, tiles_per_scan, bias_ptr, rm, NL: tl.constexpr, SW: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """Tile t -> (its scan b, the global point index pt of each row, valid: row < K, the scan's
    biases bias[b])."""
    b = t // tiles_per_scan
    row = (t - b * tiles_per_scan) * BLOCK_M + rm
    valid = row < K
    pt = b * K + row
    bias_b = bias_ptr + b * ((NL + 1) * SW)
    return b, pt, valid, bias_b


@triton.jit
def _output_layer(last, w_out, bias_b, tgt_ptr, loss_ptr, cls_ptr, pt, valid, write_cls, rm, rk, rc, c_ok,
                  NL: tl.constexpr, HP: tl.constexpr, SW: tl.constexpr, BLOCK_K: tl.constexpr,
                  CDT: tl.constexpr, DOT_PREC: tl.constexpr):
    """logits = h_{NL-1} W_out^T + b_out (h in slot `last`, w_out = fw[NL], b_out = bias_b[NL]) on a
    (BLOCK_M, CP) fp32 register tile, -inf past C (c_ok = rc < C); log-softmax; stores the
    cross-entropy of the target at the valid points pt (and, with write_cls, the argmax class).
    Returns (exp(logits - max), Σ exp, onehot of the target) for the backward's δ_out."""
    lacc = _tile_dot(tl.zeros((rm.shape[0], rc.shape[0]), dtype=tl.float32), last, w_out, HP, rm, rk, rc, SW,
                     BLOCK_K, CDT, DOT_PREC)
    logits = lacc + tl.load(bias_b + NL * SW + rc)[None, :]
    logits = tl.where(c_ok[None, :], logits, float("-inf"))
    mx = tl.max(logits, axis=1)
    ex = tl.exp(logits - mx[:, None])
    se = tl.sum(ex, axis=1)
    tgt = tl.load(tgt_ptr + pt, mask=valid, other=0).to(tl.int32)
    onehot = rc[None, :] == tgt[:, None]
    lt = tl.sum(tl.where(onehot, logits, 0.0), axis=1)
    loss = mx + tl.log(se) - lt
    tl.store(loss_ptr + pt, loss, mask=valid)
    if write_cls != 0:                        # the restoration: most likely class (first max)
        tl.store(cls_ptr + pt, tl.argmax(logits, axis=1).to(tl.uint8), mask=valid)
    return ex, se, onehot


@triton.jit
def _backward_sums(base, last, bw_ptr, part_ptr, pid, B, b, ex, se, onehot, valid, c_ok, rm, rn, rc,
                   NL: tl.constexpr, LI: tl.constexpr, HP: tl.constexpr, HRP: tl.constexpr,
                   SW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SLOT: tl.constexpr,
                   ODT: tl.constexpr, CDT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """From δ_out = softmax - onehot (BLOCK_M, CP: ex / se - onehot from `_output_layer`, 0 past C
    and on rows past K) down to δ_0: δ_{l-1} = (δ_l W_l[:, h]) ⊙ 1[h_{l-1} > 0], through two δ
    slots; adds the column sums of δ_0 and δ_LI to this program's partials of scan b, part[pid, b]
    (part_b[0:SW] and part_b[SW:2SW])."""
    d_out = ex / se[:, None] - onehot.to(tl.float32)
    d_out = tl.where(valid[:, None] & c_ok[None, :], d_out, 0.0)
    part_b = part_ptr + ((pid * B + b) * 2) * SW
    rk = tl.arange(0, BLOCK_K)
    d_op = _operand(d_out, ODT, UPCAST).to(CDT)
    wb = bw_ptr + NL * (SW * SW)
    d_first = base + (NL + 1) * SLOT
    for n0 in range(0, HP, BLOCK_N):
        wc = tl.load(wb + n0 + (rc[:, None] * SW + rn[None, :]))
        gacc = tl.dot(d_op, wc.to(CDT), input_precision=DOT_PREC)
        hm = tl.load(last + n0 + (rm[:, None] * SW + rn[None, :]))
        dl = tl.where(hm > 0, gacc, 0.0)
        tl.store(d_first + n0 + (rm[:, None] * SW + rn[None, :]), _operand(dl, ODT, UPCAST))
        if LI == NL - 1:
            pp = part_b + SW + n0 + rn
            tl.store(pp, tl.load(pp) + tl.sum(dl, axis=0))
    tl.debug_barrier()
    for jj in range(0, NL - 1):
        l = NL - 1 - jj                                       # δ_l -> δ_{l-1}
        nrows = tl.where(l == LI - 1, HRP, HP)                # width of δ_l
        kcols = tl.where(l == LI, HRP, HP)                    # width of δ_{l-1}
        d_in = base + (NL + 1 + jj % 2) * SLOT
        d_nx = base + (NL + 1 + (jj + 1) % 2) * SLOT
        h_prev = base + l * SLOT                              # slot of h_{l-1}
        wb = bw_ptr + l * (SW * SW)
        do_sum = (l == 1) | (l == LI + 1)
        p_sum = part_b + tl.where(l == 1, 0, SW)
        for n0 in range(0, kcols, BLOCK_N):
            acc = tl.zeros((rm.shape[0], BLOCK_N), dtype=tl.float32)
            acc = _tile_dot(acc, d_in, wb + n0, nrows, rm, rk, rn, SW, BLOCK_K, CDT, DOT_PREC)
            hm = tl.load(h_prev + n0 + (rm[:, None] * SW + rn[None, :]))
            dl = tl.where(hm > 0, acc, 0.0)
            if l > 1:
                tl.store(d_nx + n0 + (rm[:, None] * SW + rn[None, :]), _operand(dl, ODT, UPCAST))
            if do_sum:
                pp = p_sum + n0 + rn
                tl.store(pp, tl.load(pp) + tl.sum(dl, axis=0))
        tl.debug_barrier()


# Runtime integers are not specialised (Triton would turn a 1 into a constant and tag multiples
# of 16), nor the alignment of the index and target pointers (chunks of a caller's tensor):
# one compiled kernel per (GPU, precision, decoder shape), exactly the one that aot_compile()
# builds, whatever B, K, the grid shape, the flags or the chunking.
@triton.jit(do_not_specialize=["K", "n_tiles", "tiles_per_scan", "B", "Y0", "Z0", "nslot", "need_grad",
                             "write_cls"],
            do_not_specialize_on_alignment=["idx_ptr", "tgt_ptr"])
def fused_point_kernel(
    idx_ptr,            # (B*K, 3) int32 voxel indices, scan-major
    tgt_ptr,            # (B*K,) int32 target class of each point
    tab_ptr,            # (X+Y+Z, 2L) fp32 per-axis γ rows
    fw_ptr,             # (NL+1, RW, SW) forward weights W_l^T, operand dtype
    bw_ptr,             # (NL+1, SW, SW) backward weights W_l[:, h part], operand dtype
    bias_ptr,           # (B, NL+1, SW) fp32 biases, c0 and cr per scan
    loss_ptr,           # (B*K,) fp32 out: cross-entropy per point
    part_ptr,           # (P, B, 2, SW) fp32 out, zeroed: per-program Σ δ_0 and Σ δ_LI
    scratch_ptr,        # (P, nslot, BLOCK_M, SW) operand dtype: per-program slots
    cls_ptr,            # (B*K,) uint8 out: argmax class, when write_cls
    K,                  # points per scan
    n_tiles,            # B * tiles_per_scan
    tiles_per_scan,     # ⌈K / BLOCK_M⌉
    B,                  # scans
    Y0,                 # first table row of axis 1 (= X)
    Z0,                 # first table row of axis 2 (= X + Y)
    nslot,              # slots per program: 3 forward-only, NL + 3 with the gradient
    need_grad,          # 0: losses only; 1: also the Σ δ partials
    write_cls,          # 0 / 1: write the argmax class of each point
    NL: tl.constexpr,       # hidden layers (the output layer is layer NL)
    LI: tl.constexpr,       # latent_in: the layer that re-reads [z, γ]
    HP: tl.constexpr,       # hidden width H, padded to BLOCK_N
    HRP: tl.constexpr,      # width HR = H - D - G of h_{LI-1}, padded to BLOCK_N
    SW: tl.constexpr,       # slot (and weight tile) row stride: max(HP, padded GP, padded CP)
    RW: tl.constexpr,       # rows of a forward weight block: max(SW, HRP + GP)
    TWO_L: tl.constexpr,    # 2L: γ columns per axis
    G: tl.constexpr,        # 6L: γ columns
    GP: tl.constexpr,       # G padded to a power of two >= 16
    GK: tl.constexpr,       # reduction chunk over γ: min(GP, BLOCK_K)
    C: tl.constexpr,        # classes
    CP: tl.constexpr,       # C padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # points per tile
    BLOCK_N: tl.constexpr,  # output columns per accumulator tile
    BLOCK_K: tl.constexpr,  # reduction chunk
    UPCAST: tl.constexpr,   # dots on fp32 copies of bf16 operands (the interpreter), RNE emulated
    DOT_PREC: tl.constexpr,  # tl.dot input_precision for fp32 operands ("ieee": exact)
):
    """One persistent program: loops over tiles of BLOCK_M points (see the module docstring)."""
    ODT: tl.constexpr = scratch_ptr.dtype.element_ty          # operand dtype (fp32 or bf16)
    CDT: tl.constexpr = tl.float32 if UPCAST else ODT        # dot input dtype (interpreter: fp32)
    SLOT: tl.constexpr = BLOCK_M * SW
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    base = scratch_ptr + pid.to(tl.int64) * nslot * SLOT
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rc = tl.arange(0, CP)
    c_ok = rc < C
    w_out = fw_ptr + NL * (RW * SW)

    for t in range(pid, n_tiles, nprog):
        b, pt, valid, bias_b = _tile_points(t, K, tiles_per_scan, bias_ptr, rm, NL, SW, BLOCK_M)

        # ---- prologue: γ for the tile into slot 0; the hidden layers, slot to slot
        _gather_encoding(idx_ptr, tab_ptr, base, pt, valid, rm, Y0, Z0, SW, TWO_L, G, GP, ODT, UPCAST)
        _hidden_layers(base, fw_ptr, bias_b, need_grad, rm, rn, rk, NL, LI, HP, HRP, SW, RW, GP, GK,
                       BLOCK_N, BLOCK_K, SLOT, ODT, CDT, UPCAST, DOT_PREC)

        # ---- epilogue: logits, log-softmax, cross-entropy of the target (and the argmax class)
        last = base + tl.where(need_grad != 0, NL, 1 + (NL - 1) % 2) * SLOT
        ex, se, onehot = _output_layer(last, w_out, bias_b, tgt_ptr, loss_ptr, cls_ptr, pt, valid, write_cls,
                                       rm, rk, rc, c_ok, NL, HP, SW, BLOCK_K, CDT, DOT_PREC)

        # ---- backward to the pre-activations of layers 0 and LI (only their sums leave)
        if need_grad != 0:
            _backward_sums(base, last, bw_ptr, part_ptr, pid, B, b, ex, se, onehot, valid, c_ok, rm, rn, rc,
                           NL, LI, HP, HRP, SW, BLOCK_N, BLOCK_K, SLOT, ODT, CDT, UPCAST, DOT_PREC)
        tl.debug_barrier()


# ---------------------------------------------------------------------------------------------
# Tile configurations per GPU generation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TileConfig:
    """Tile shape and launch options of `fused_point_kernel` (built with keywords)."""

    BLOCK_M: int          # points per tile (rows of every tl.dot)
    BLOCK_N: int          # output columns per accumulator tile
    BLOCK_K: int          # reduction chunk
    num_warps: int
    num_stages: int
    programs_per_sm: int = 1
    dot_precision: str = "ieee"   # fp32 operands only: "ieee" (exact), or "tf32x3" (untested)
    maxnreg: int | None = None    # ptxas register cap (None: ptxas' own heuristic)

    def launch_options(self) -> dict:
        """Keyword arguments of a kernel launch: num_warps, num_stages, and maxnreg when set."""
        opts = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts


# Keyed by (architecture family, precision); the paper-size choice of each family is compiled
# ahead of time by tests/test_triton_compile.py, which fails if any of them uses stack (spills)
# on cc >= 8.0 (registers / stack / shared bytes read from the cubin with cuobjdump).
# bf16: tensor-core dots (wgmma on sm_90, mma.sync on sm_8x), BLOCK_M = 128 points per
# program, 128-wide accumulators, 8 warps. sm_90 / sm_80 have 228 / 164 KB of shared memory
# per SM: 3 stages of (128x64 + 64x128) bf16 = 96 KB; sm_86 / sm_89 have 100 KB: BLOCK_K 32.
# float32: exact ("ieee") FMA dots; Triton keeps a K-deep slice of both operands per thread,
# so BLOCK_K = 16 and 64x64 tiles (168 registers on sm_90). On sm_80 that tile needs 250, too
# close to 255: 32x64 (168, three programs per SM). On sm_86/89 ptxas' own heuristic caps
# kernels at 168 registers and spills (8 bytes for 64x64, 96 for 32x64): maxnreg=255 lifts the
# cap (184 registers, no stack).
# sm_75 / sm_61 have no bf16 tensor cores (the backend refuses them; compiled for the record).
CONFIGS: dict[tuple[str, str], TileConfig] = {
    ("sm90", "bf16"): TileConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    ("sm90", "float32"): TileConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2,
                                    programs_per_sm=2),
    ("sm80", "bf16"): TileConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    ("sm80", "float32"): TileConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2,
                                    programs_per_sm=3),
    ("sm86", "bf16"): TileConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    ("sm86", "float32"): TileConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2,
                                    programs_per_sm=2, maxnreg=255),
    ("sm75", "bf16"): TileConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2,
                                 programs_per_sm=2),
    ("sm75", "float32"): TileConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2,
                                    programs_per_sm=2),
    ("interpreter", "bf16"): TileConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=1, num_stages=1),
    ("interpreter", "float32"): TileConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=1, num_stages=1),
}
INTERPRETER_PROGRAMS = 3      # few programs, so the persistent tile loop is exercised


def arch_key(cc: int | None) -> str:
    """Compute capability (e.g. 86) -> config family; None -> the interpreter."""
    if cc is None:
        return "interpreter"
    if cc in (86, 87, 89) or cc >= 120:       # ~100 KB of shared memory per SM (sm_120: untested)
        return "sm86"
    if cc >= 90:
        return "sm90"
    if cc >= 80:
        return "sm80"
    return "sm75"


PRECISIONS = {"float32": torch.float32, "bf16": torch.bfloat16}   # name -> operand dtype


def _checked_precision(precision: str) -> str:
    """The kernels take the canonical names only (ifad_fast.backends.parse_precision makes them)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'float32' or 'bf16', got {precision!r}")
    return precision


def interpreted() -> bool:
    """True when the kernels run in Triton's interpreter (on CPU tensors): TRITON_INTERPRET=1
    was set before triton (whose own jit helpers, tl.sum, tl.max..., must be interpreted too)
    and this module were imported."""
    from triton.runtime.jit import JITFunction
    return not isinstance(fused_point_kernel, JITFunction) and not isinstance(tl.standard.sum, JITFunction)


def device_cc(device: torch.device) -> int | None:
    """Compute capability of a CUDA device as an int (8.6 -> 86); None for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def config_for(cc: int | None, precision: str) -> TileConfig:
    """The tile configuration for compute capability `cc` (None: the interpreter)."""
    return CONFIGS[(arch_key(cc), _checked_precision(precision))]


def pick_config(device, precision: str) -> TileConfig:
    """The tile configuration for `device` ('float32' or 'bf16')."""
    return config_for(device_cc(device), precision)


# ---------------------------------------------------------------------------------------------
# Packed weights
# ---------------------------------------------------------------------------------------------


def _ceil(x: int, m: int) -> int:
    return -(-x // m) * m


def _pow2_at_least(x: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (x - 1).bit_length()))


@dataclass(frozen=True)
class Dims:
    """Every width the kernel needs, padded for a tile configuration."""

    D: int
    L: int
    H: int
    NL: int
    LI: int
    C: int
    BLOCK_N: int
    BLOCK_K: int

    @property
    def G(self):
        """Width of the positional encoding γ(p): 6L."""
        return 6 * self.L

    @property
    def HR(self):
        """Width of the h block of layer LI's input [h, z, γ]: H - D - G."""
        return self.H - self.D - self.G

    @property
    def HP(self):
        """H padded to a multiple of BLOCK_N."""
        return _ceil(self.H, self.BLOCK_N)

    @property
    def HRP(self):
        """HR padded to a multiple of BLOCK_N."""
        return _ceil(self.HR, self.BLOCK_N)

    @property
    def GP(self):
        """G padded to a power of two (at least 16)."""
        return _pow2_at_least(self.G)

    @property
    def CP(self):
        """C (classes) padded to a power of two (at least 16)."""
        return _pow2_at_least(self.C)

    @property
    def SW(self):
        """Slot width: columns of a scratch slot and of the packed weights, the widest of HP, GP
        and CP rounded up to BLOCK_N."""
        return max(self.HP, _ceil(self.GP, self.BLOCK_N), _ceil(self.CP, self.BLOCK_N))

    @property
    def RW(self):
        """Rows of each packed forward weight matrix: SW, or HRP + GP when layer LI's [h, γ] input
        is wider."""
        return max(self.SW, self.HRP + self.GP)

    def nslot(self, need_grad: bool) -> int:
        """Scratch slots per program: γ + two h slots forward-only; γ + NL h_l + two δ with the gradient."""
        return self.NL + 3 if need_grad else 3

    def constexprs(self, cfg: TileConfig, upcast: bool = False, dot_prec: str = "ieee") -> dict:
        """The constexpr arguments of fused_point_kernel for this decoder and tile configuration."""
        return dict(NL=self.NL, LI=self.LI, HP=self.HP, HRP=self.HRP, SW=self.SW, RW=self.RW,
                    TWO_L=2 * self.L, G=self.G, GP=self.GP, GK=min(self.GP, cfg.BLOCK_K), C=self.C, CP=self.CP,
                    BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                    UPCAST=bool(upcast), DOT_PREC=dot_prec)


def dims_from_shapes(layer_shapes, latent_dim: int, n_freqs: int, latent_in: int, cfg: TileConfig) -> Dims:
    """layer_shapes: [(out, in)] of every linear layer (output layer last), DeepSDF layout."""
    n_layers = len(layer_shapes) - 1
    H = layer_shapes[-1][1]          # the output layer reads the hidden width
    C = layer_shapes[-1][0]
    d = Dims(D=latent_dim, L=n_freqs, H=H, NL=n_layers, LI=latent_in, C=C,
             BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K)
    if cfg.BLOCK_N % cfg.BLOCK_K:
        raise ValueError("BLOCK_N must be a multiple of BLOCK_K")
    if not 0 < latent_in < n_layers:
        raise ValueError(f"latent_in must be in 1..{n_layers - 1}")
    expect = []
    for i in range(n_layers):
        fan_in = latent_dim + d.G if i == 0 else H
        fan_out = H - latent_dim - d.G if i + 1 == latent_in else H
        expect.append((fan_out, fan_in))
    expect.append((C, H))
    if [tuple(s) for s in layer_shapes] != expect:
        raise ValueError(f"layer shapes {layer_shapes} do not match the DeepSDF layout {expect}")
    return d


class PackedDecoder:
    """Folded decoder weights laid out for `fused_point_kernel` on one device, one precision.

    weights: [(W (out, in), b (out,))] per layer, weight norm folded (Decoder.weights()).
    """

    def __init__(self, weights, latent_dim: int, n_freqs: int, latent_in: int, device,
                 precision: str = "float32", config: TileConfig | None = None):
        self.device = torch.device(device)
        self.precision = _checked_precision(precision)
        self.config = config or pick_config(self.device, self.precision)
        shapes = [tuple(w.shape) for w, _ in weights]
        d = self.dims = dims_from_shapes(shapes, latent_dim, n_freqs, latent_in, self.config)
        self.op_dtype = PRECISIONS[self.precision]
        f32 = dict(dtype=torch.float32, device=self.device)
        ws = [(w.detach().to(**f32), b.detach().to(**f32)) for w, b in weights]
        NL, LI, D, G, HR, HRP = d.NL, d.LI, d.D, d.G, d.HR, d.HRP
        fw = torch.zeros(NL + 1, d.RW, d.SW, **f32)
        bw = torch.zeros(NL + 1, d.SW, d.SW, **f32)
        bias = torch.zeros(NL + 1, d.SW, **f32)
        for l, (w, b) in enumerate(ws):
            n_out = w.shape[0]
            bias[l, :n_out] = b
            if l == 0:
                fw[0, :G, :n_out] = w[:, D:].T
            elif l == LI:
                fw[l, :HR, :n_out] = w[:, :HR].T
                fw[l, HRP:HRP + G, :n_out] = w[:, HR + D:].T
                bw[l, :n_out, :HR] = w[:, :HR]
            else:
                fw[l, :w.shape[1], :n_out] = w.T
                bw[l, :n_out, :w.shape[1]] = w
        self.fw = fw.to(self.op_dtype).contiguous()
        self.bw = bw.to(self.op_dtype).contiguous()
        self.bias = bias
        # the z share of layers 0 and LI, in fp32 (hoisted per scan)
        self.w0z = ws[0][0][:, :D].contiguous()                # (H', D)
        self.b0 = ws[0][1]
        self.wrz = ws[LI][0][:, HR:HR + D].contiguous()        # (H, D)
        self.br = ws[LI][1]

    def scan_bias(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) -> (B, NL+1, SW) fp32 biases of every layer, with the hoisted z share per scan:
        c0 = W0z z + b0 at row 0 and cr = Wrz z + br at row LI."""
        d = self.dims
        z = z.to(torch.float32)
        bias = self.bias.unsqueeze(0).repeat(z.shape[0], 1, 1)
        bias[:, 0, :self.w0z.shape[0]] = torch.addmm(self.b0, z, self.w0z.T)
        bias[:, d.LI, :self.wrz.shape[0]] = torch.addmm(self.br, z, self.wrz.T)
        return bias


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _n_programs(pack: PackedDecoder, n_tiles: int) -> int:
    """Persistent programs of one launch: SMs × programs_per_sm on a GPU, few in the interpreter."""
    if pack.device.type == "cuda":
        sms = torch.cuda.get_device_properties(pack.device).multi_processor_count
        return max(1, min(n_tiles, sms * pack.config.programs_per_sm))
    return max(1, min(n_tiles, INTERPRETER_PROGRAMS))


def point_losses(pack: PackedDecoder, bias: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor,
                 shape, table: torch.Tensor, need_grad: bool, classes: bool = False):
    """One fused launch. bias: (B, NL+1, SW) from pack.scan_bias(z); idx: (B, K, 3) int;
    targets: (B, K) int; table: (X+Y+Z, 2L) fp32 per-axis γ rows of the grid `shape`
    (ifad_fast.model.axis_encoding) on pack.device. Returns (loss (B, K) fp32, sums (B, 2, SW)
    fp32 or None, classes (B, K) uint8 argmax or None), where sums[:, 0] = Σ_points δ_0 and
    sums[:, 1] = Σ_points δ_LI (unscaled: δ_out = softmax - onehot)."""
    d, cfg = pack.dims, pack.config
    B, K = int(idx.shape[0]), int(idx.shape[1])
    if K == 0 or B == 0:
        raise ValueError("need at least one point per scan")
    X, Y, Z = (int(s) for s in shape)
    if tuple(table.shape) != (X + Y + Z, 2 * d.L) or table.dtype != torch.float32:
        raise ValueError(f"table must be ({X + Y + Z}, {2 * d.L}) float32, got {tuple(table.shape)} {table.dtype}")
    dev = pack.device
    idx = idx.to(device=dev, dtype=torch.int32).reshape(B * K, 3).contiguous()
    tgt = targets.to(device=dev, dtype=torch.int32).reshape(B * K).contiguous()
    tiles_per_scan = triton.cdiv(K, cfg.BLOCK_M)
    n_tiles = B * tiles_per_scan
    nprog = _n_programs(pack, n_tiles)
    loss = torch.empty(B * K, dtype=torch.float32, device=dev)
    nslot = d.nslot(need_grad)
    scratch = torch.empty(nprog * nslot * cfg.BLOCK_M * d.SW, dtype=pack.op_dtype, device=dev)
    part = torch.zeros((nprog, B, 2, d.SW) if need_grad else (1,), dtype=torch.float32, device=dev)
    cls = torch.empty(B * K if classes else 1, dtype=torch.uint8, device=dev)
    upcast = interpreted() and pack.op_dtype == torch.bfloat16
    const = d.constexprs(cfg, upcast, cfg.dot_precision)
    fused_point_kernel[(nprog,)](
        idx, tgt, table.contiguous(), pack.fw, pack.bw, bias.contiguous(), loss, part, scratch, cls,
        K, n_tiles, tiles_per_scan, B, X, X + Y, nslot, int(bool(need_grad)), int(bool(classes)),
        **const, **cfg.launch_options())
    sums = part.sum(0) if need_grad else None
    return loss.view(B, K), sums, (cls.view(B, K) if classes else None)


class FusedPointLoss(torch.autograd.Function):
    """mean_loss(z) -> (B,) per-scan mean cross-entropy; backward -> dL/dz (B, D).

    When z requires grad the forward launch also produces Σ δ_0 and Σ δ_LI (one fused launch per
    step); the backward is then two tiny matmuls: dz_b = g_b / K · (W0z^T Σδ_0 + Wrz^T Σδ_LI).
    """

    @staticmethod
    def forward(ctx, z, pack, idx, targets, shape, table):
        """z (B, D) float32, idx (B, K, 3) int, targets (B, K) int, table (X+Y+Z, 2L) float32 ->
        (B,) float32 mean cross-entropy; saves Σδ_0 and Σδ_LI for backward when z needs a gradient."""
        need_grad = ctx.needs_input_grad[0]
        with torch.no_grad():
            bias = pack.scan_bias(z.detach())
            loss, sums, _ = point_losses(pack, bias, idx, targets, shape, table, need_grad)
        K = loss.shape[1]
        if need_grad:
            H0, Hr = pack.w0z.shape[0], pack.wrz.shape[0]
            ctx.save_for_backward(sums[:, 0, :H0].contiguous(), sums[:, 1, :Hr].contiguous())
        ctx.pack = pack
        ctx.K = K
        ctx.z_dtype = z.dtype
        return loss.mean(dim=1)

    @staticmethod
    def backward(ctx, grad_out):
        """grad_out (B,) -> dL/dz (B, D) in z's dtype (None for the other inputs)."""
        s0, sr = ctx.saved_tensors
        pack = ctx.pack
        g = (grad_out.to(torch.float32) / ctx.K)[:, None]
        dz = g * (s0 @ pack.w0z + sr @ pack.wrz)
        return dz.to(ctx.z_dtype), None, None, None, None, None


def fused_mean_loss(pack: PackedDecoder, z, idx, targets, shape, table: torch.Tensor) -> torch.Tensor:
    """(B,) per-scan mean cross-entropy of K points, differentiable with respect to z (B, D).
    idx (B, K, 3) int, targets (B, K) int, table (X+Y+Z, 2L) fp32 (see point_losses)."""
    return FusedPointLoss.apply(z, pack, idx, targets, tuple(int(s) for s in shape), table)


@torch.no_grad()
def grid_scores(pack: PackedDecoder, z, idx, targets, shape, table: torch.Tensor, chunk: int = 1 << 20,
                classes: bool = False):
    """Per-voxel cross-entropy (M,) fp32 of one scan (z: (D,)) at voxel indices idx (M, 3),
    with the targets already gathered at those voxels ((M,) int); table as in point_losses.
    With classes=True, returns (scores, most likely class (M,) uint8) from the same launch.
    Launched in chunks of `chunk` points, so only the int32 copy of one chunk's indices is made
    and memory stays bounded (the kernel's scratch depends only on the number of programs)."""
    M = int(idx.shape[0])
    out = torch.empty(M, dtype=torch.float32, device=pack.device)
    cls = torch.empty(M, dtype=torch.uint8, device=pack.device) if classes else None
    if M:
        bias = pack.scan_bias(z.reshape(1, -1))
        for s in range(0, M, chunk):
            e = min(M, s + chunk)
            loss, _, c = point_losses(pack, bias, idx[s:e][None], targets[s:e][None], shape, table, False,
                                      classes)
            out[s:e] = loss[0]
            if classes:
                cls[s:e] = c[0]
    return (out, cls) if classes else out


# ---------------------------------------------------------------------------------------------
# The numerical specification, in plain torch
# ---------------------------------------------------------------------------------------------


def fused_point_ref(weights, latent_dim: int, latent_in: int, z: torch.Tensor, idx: torch.Tensor,
                    targets: torch.Tensor, shape, table: torch.Tensor, precision: str = "bf16"):
    """What `fused_point_kernel` computes, written with torch float32 ops: the kernel's spec.

    weights: [(W (out, in), b (out,))] folded, output layer last; z (B, D) fp32; idx (B, K, 3)
    int; targets (B, K) int; table (X+Y+Z, 2L) fp32 as for the kernel. Returns (per-point
    cross-entropy (B, K) fp32, d(Σ_b mean_k loss)/dz (B, D) fp32).

    The roundings are the kernel's: with precision 'bf16', the weights, γ, every stored h_l and
    every δ that feeds a dot are rounded to bf16 (round to nearest even), products accumulated
    in fp32; the hoisted z share (c0, cr), biases, logits, softmax, cross-entropy and the sums
    Σ δ_0, Σ δ_LI stay fp32; Σ δ is taken before rounding. With 'float32' nothing is rounded (the
    folded decoder in fp32, γ from the table).
    """
    dt = PRECISIONS[_checked_precision(precision)]
    r = lambda x: x.to(dt).to(torch.float32)  # noqa: E731
    D, LI = latent_dim, latent_in
    X, Y = int(shape[0]), int(shape[1])
    off = (0, X, X + Y)
    gamma = r(torch.cat([table[idx[..., c].long() + off[c]] for c in range(3)], -1))
    NL = len(weights) - 1
    G = gamma.shape[-1]
    HR = weights[LI][0].shape[1] - D - G
    W = [r(w) for w, _ in weights]
    c0 = z @ weights[0][0][:, :D].T + weights[0][1]
    cr = z @ weights[LI][0][:, HR:HR + D].T + weights[LI][1]
    hs = [r(torch.relu(gamma @ W[0][:, D:].T + c0[:, None]))]
    for l in range(1, NL):
        if l == LI:
            pre = hs[-1] @ W[l][:, :HR].T + gamma @ W[l][:, HR + D:].T + cr[:, None]
        else:
            pre = hs[-1] @ W[l].T + weights[l][1]
        hs.append(r(torch.relu(pre)))
    logits = hs[-1] @ W[NL].T + weights[NL][1]
    tgt = targets.long()
    loss = -torch.log_softmax(logits, -1).gather(-1, tgt[..., None]).squeeze(-1)
    d = torch.softmax(logits, -1) - torch.nn.functional.one_hot(tgt, logits.shape[-1]).float()
    d = (r(d) @ W[NL]) * (hs[NL - 1] > 0)
    sums = {NL - 1: d.sum(1)}
    for l in range(NL - 1, 0, -1):
        w = W[l][:, :HR] if l == LI else W[l]
        d = (r(d) @ w) * (hs[l - 1] > 0)
        sums[l - 1] = d.sum(1)
    dz = (sums[0] @ weights[0][0][:, :D] + sums[LI] @ weights[LI][0][:, HR:HR + D]) / idx.shape[1]
    return loss, dz


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): used by tests/test_triton_compile.py
# ---------------------------------------------------------------------------------------------


def aot_compile(dims: Dims, cfg: TileConfig, precision: str, cc: int):
    """Compile `fused_point_kernel` for sm_<cc> with the launch-time specialisation of
    `point_losses` (pointers 16-byte aligned). Needs TRITON_INTERPRET unset at import time."""
    from triton.runtime.jit import JITFunction
    if not isinstance(fused_point_kernel, JITFunction):
        raise RuntimeError("kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)")
    op = {"bf16": "bf16", "float32": "fp32"}[_checked_precision(precision)]
    pointers = dict(idx_ptr="*i32", tgt_ptr="*i32", tab_ptr="*fp32", fw_ptr=f"*{op}", bw_ptr=f"*{op}",
                    bias_ptr="*fp32", loss_ptr="*fp32", part_ptr="*fp32", scratch_ptr=f"*{op}",
                    cls_ptr="*u8")
    ints = dict(K="i32", n_tiles="i32", tiles_per_scan="i32", B="i32", Y0="i32", Z0="i32",
                nslot="i32", need_grad="i32", write_cls="i32")
    const = dims.constexprs(cfg, False, cfg.dot_precision)
    signature = {**pointers, **ints, **{k: "constexpr" for k in const}}
    names = list(fused_point_kernel.arg_names)
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in pointers
             if k not in ("idx_ptr", "tgt_ptr")}      # as do_not_specialize_on_alignment
    src = triton.compiler.ASTSource(fn=fused_point_kernel, signature=signature, constexprs=const, attrs=attrs)
    target = triton.backends.compiler.GPUTarget("cuda", cc, 32)
    return triton.compile(src, target=target, options=cfg.launch_options())


def resource_usage(compiled) -> dict:
    """{'REG': n, 'STACK': bytes, 'LOCAL': bytes, 'SHARED': bytes} from the cubin, through the
    cuobjdump that ships in triton's wheel."""
    import re
    import subprocess
    import tempfile
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in found.items()}
