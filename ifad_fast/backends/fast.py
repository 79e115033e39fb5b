"""FastBackend ("cpu"): the restoration hot path with less work and the same numbers.

Same contract and results as `base.TorchBackend` (see base.py), on any torch device.
What it does differently (the identities are derived in docs/numerics.md):

1. Weight norm is folded once (`decoder.weights()`). Layer 0 reads [z, γ] and the
   re-injection layer r = latent_in reads [h, z, γ]; their weights are split by input block.
   The z blocks become one bias vector per scan and call: c0 = W0z z + b0, c_r = W_rz z + b_r.
2. The positional encoding never exists per point. Voxel coordinates take only S distinct
   values per axis, so γ restricted to one axis is an exact (S, 2L) table (computed by the very
   ops of `model.positional_encoding`), and since layers 0 and r are linear in γ, their γ blocks
   collapse to per-axis tables P_a = γ_a W_γa^T of shape (S_a, hidden) (γ_a from
   `model.axis_encoding`, the products in float64, rounded once to float32). A point's layer-0
   pre-activation is then P_x[i] + P_y[j] + P_z[k] + c0 -- one `embedding_bag(mode="sum")` over a
   per-call table with c0 folded into the x rows, no matmul at all -- and layer r's is
   h W_rh^T added in place (BLAS beta=1) onto the same kind of three-row sum.
3. No weight gradients, and the backward is done eagerly, chunk by chunk, inside the forward
   of a custom autograd.Function (only when z needs a gradient): the loss of a scan is a sum of
   per-point terms whose gradient needs only that point's activations, so each chunk of points
   runs forward, then δ = softmax - onehot down through the transposed weights (the h block
   only at layer r, nothing below layer 0), and adds Σδ0 and Σδ_r of the chunk to per-scan
   sums. The chunk's activations stay cache-resident and are overwritten by the next chunk;
   backward() is then dL/dz = grad_output/K · (W0z^T Σδ0 + W_rz^T Σδ_r), a (B, D) scaling.
4. Activation and δ buffers are preallocated per chunk size and reused across calls (the tables
   and buffers live in `BoundedCache`s: 8 grid shapes, 4 chunk sizes), so a call allocates
   little and copies nothing from the host (a step can be captured in a CUDA graph); points
   run in chunks of `chunk` rows (default: 1024 on one CPU thread, 8192 on several -- see
   `default_chunk`; 32768 on CUDA). `torch.set_num_threads` is left to the caller; on a shared
   2-core machine one thread was the faster choice.
5. precision="bf16": per-point matmul operands and activations in bfloat16 (float32 accumulation
   inside the BLAS / tensor cores), tables, biases, logits, cross-entropy and the z-gradient sums
   in float32. Gate: losses within 1e-2 relative of float32. On CPUs without native bf16
   (AVX2 only) torch's bf16 matmuls are several times slower than float32: use it on CUDA or
   on CPUs with AVX512-BF16/AMX.
6. `score` runs the same forward in chunks, no grad, into a preallocated float32 output.
7. precision="tf32" (CUDA only): the float32 path with its matmuls on TF32 tensor cores, set
   for each call only (`Backend.matmul_precision`). Gated like bf16: losses within 1e-2 of float32.

Per point the paper-size decoder then costs 1.52 M multiply-adds forward (1.84 M in the plain
decoder, 1.58 M with only z hoisted) and 1.52 M backward to z (no weight gradients).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .base import OPERAND_DTYPES, Backend, BoundedCache, cpu_has_native_bf16, precisions_of
from ..errors import IfadError
from ..model import Decoder, axis_encoding

DEFAULT_CHUNK = {"cuda": 32768}


def default_chunk(device: torch.device) -> int:
    """Rows per chunk when none is given: measured on a 2-core AVX2 EPYC (see bench/RESULTS.md).

    One thread: 1024 (activations stay in cache; 16,200 in one go is ~35 % slower). Several
    threads: 8192, because every op is a parallel region whose threads must all be scheduled,
    and on a shared machine each region can wait a time slice for a preempted partner: fewer,
    bigger ops win there (at load 5 on 2 cores, 8192 rows beat 1024 by 1.3× best-of-4 and 2.9×
    median); at load 3, 1024 was ~15 % faster (best of 5). Pass `chunk` to choose.
    """
    if device.type != "cpu":
        return DEFAULT_CHUNK.get(device.type, 8192)
    return 1024 if torch.get_num_threads() == 1 else 8192


def _threshold_backward_(grad: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """grad *= (act > 0), in place, one pass, no temporary mask."""
    return torch.ops.aten.threshold_backward.grad_input(grad, act, 0, grad_input=grad)


def _cast_into(buf: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x itself when it already has buf's dtype (no copy), else x rounded into buf."""
    return x if x.dtype == buf.dtype else buf.copy_(x)


class _Buffers:
    """Per-chunk-size scratch: activations of every hidden layer (compute dtype), two δ buffers,
    logits and the δ of the last hidden layer (float32), row numbers."""

    def __init__(self, rows, widths, hidden_max, n_classes, dtype, device):
        self.h = [torch.empty(rows, w, dtype=dtype, device=device) for w in widths]
        self.d = [torch.empty(rows * hidden_max, dtype=dtype, device=device) for _ in range(2)]
        self.logits = torch.empty(rows, n_classes, dtype=torch.float32, device=device)
        self.dlast = torch.empty(rows, widths[-1], dtype=torch.float32, device=device)
        self.rows = torch.arange(rows, device=device)

    def delta(self, k: int, m: int, width: int) -> torch.Tensor:
        """δ buffer k as a contiguous (m, width) matrix."""
        return self.d[k][:m * width].view(m, width)


class _MeanLoss(torch.autograd.Function):
    """(B,) mean cross-entropy per scan; the z-gradient is computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, z, backend, idx, targets, shape):
        need_grad = ctx.needs_input_grad[0]
        loss, grad = backend._loss_and_grad(z.detach(), idx, targets, shape, need_grad)
        if need_grad:
            ctx.save_for_backward(grad.to(z.device))
        return loss.to(z.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output.to(grad.dtype)[:, None] * grad, None, None, None, None


class FastBackend(Backend):
    """Folded, z-hoisted, γ-tabulated, weight-gradient-free decoder evaluation (any device)."""

    name = "cpu"
    precisions = precisions_of("cpu")
    graph_safe = True

    def __init__(self, decoder: Decoder, device="cpu", precision: str = "float32", chunk: int | None = None):
        super().__init__(decoder, device, precision)
        self.dtype = cd = OPERAND_DTYPES[self.precision]
        self.chunk = None if chunk is None else int(chunk)       # None: default_chunk() at each call
        if self.chunk is not None and self.chunk < 1:
            raise IfadError(f"chunk must be a positive number of points, got {chunk}")
        mc = self.config
        D, E, r = mc.latent_dim, 6 * mc.n_freqs, mc.latent_in
        self.D, self.L, self.r = D, mc.n_freqs, r
        ws = [(w.to(self.device, torch.float32), b.to(self.device, torch.float32)) for w, b in decoder.weights()]
        n_hidden = mc.n_layers
        # Layer 0: [W0z | W0γ]; layer r: [W_rh | W_rz | W_rγ].
        W0, b0 = ws[0]
        Wr, br = ws[r]
        hr = Wr.shape[1] - D - E
        self.W0z, self.b0, self.W0g = W0[:, :D].contiguous(), b0, W0[:, D:].contiguous()
        self.Wrz, self.br, self.Wrg = Wr[:, hr:hr + D].contiguous(), br, Wr[:, hr + D:].contiguous()
        # Per-point layers 1..n_hidden-1: h-block weights in the compute dtype, as the right operand of
        # the forward (h @ W^T) and of the backward (δ @ W). Layouts: float32 keeps both contiguous as
        # read (MKL's fastest here); bf16 uses transposed views of contiguous copies, the only layout
        # torch's CPU bf16 matmul does not run in a slow fallback (and harmless on CUDA).
        self.Wf, self.Wg, self.bias = [None], [None], [None]
        for i in range(1, n_hidden):
            W, b = ws[i]
            Wh = (W[:, :hr] if i == r else W).to(cd)
            if cd == torch.float32:
                self.Wf.append(Wh.t().contiguous())
                self.Wg.append(Wh.contiguous())
            else:
                self.Wf.append(Wh.contiguous().t())
                self.Wg.append(Wh.t().contiguous().t())
            self.bias.append(None if i == r else b.to(cd))
        # The output layer (C wide, ~0.3 % of the work) stays float32 in both precisions: logits,
        # cross-entropy and δ at the logits are float32.
        Wo, bo = ws[n_hidden]
        self.WoT, self.Wo, self.bo = Wo.t().contiguous(), Wo.contiguous(), bo
        self.widths = [ws[i][0].shape[0] for i in range(n_hidden)]     # outputs of hidden layers
        self.n_classes = Wo.shape[0]
        if cd != torch.float32 and self.device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn("precision='bf16' on a CPU without native bf16 instructions: torch's bf16 "
                          "matmuls are emulated here and run several times slower than float32",
                          RuntimeWarning, stacklevel=2)
        self.n_hidden = n_hidden
        self._tables = BoundedCache(8)          # grid shape -> per-axis tables
        self._buffers = BoundedCache(4)         # chunk rows -> _Buffers
        self._offsets = BoundedCache(8)         # (B, X, Y) -> table row offsets

    # ---------------------------------------------------------------- the contract (checked inputs)
    def _mean_loss(self, z, idx, targets, shape):
        return _MeanLoss.apply(z, self, idx, targets, shape)

    def _score(self, z, idx, targets, shape, out):
        if out is None:
            out = torch.empty(idx.shape[0], dtype=torch.float32, device=self.device)
        self._run(z[None], idx[None], targets[None], shape, need_grad=False, point_out=out)
        return out

    def _score_and_classes(self, z, idx, targets, shape):
        M = idx.shape[0]
        out = torch.empty(M, dtype=torch.float32, device=self.device)
        classes = torch.empty(M, dtype=torch.uint8, device=self.device)
        self._run(z[None], idx[None], targets[None], shape, need_grad=False, point_out=out, class_out=classes)
        return out, classes

    def _log_probs(self, z, idx, shape):
        T0, Tr, rows = self._embedding_tables(z[None].to(self.device, torch.float32), idx[None], shape)
        M = idx.shape[0]
        out = torch.empty(M, self.n_classes, dtype=torch.float32, device=self.device)
        n = max(1, min(self.chunk or default_chunk(self.device), M))
        bufs = self._bufs(n)
        for p0 in range(0, M, n):
            _, logits = self._forward(bufs, T0, Tr, rows[0, p0:p0 + n])
            torch.sub(logits, torch.logsumexp(logits, dim=1, keepdim=True), out=out[p0:p0 + n])
        return out

    # ---------------------------------------------------------------- internals
    def _axis_tables(self, shape):
        """Per-axis layer-0 and layer-r γ contributions: ((S_x+S_y+S_z, H0), (…, H_r)), float32."""
        return self._tables.get(shape, lambda: self._make_axis_tables(shape))

    def _make_axis_tables(self, shape):
        gamma = axis_encoding(shape, self.L, self.device).double()
        E2 = 2 * self.L
        p0, pr, start = [], [], 0
        for a, s in enumerate(shape):
            g = gamma[start:start + s]
            start += s
            p0.append(g @ self.W0g[:, a * E2:(a + 1) * E2].double().t())
            pr.append(g @ self.Wrg[:, a * E2:(a + 1) * E2].double().t())
        return torch.cat(p0).float(), torch.cat(pr).float()

    def _bufs(self, rows):
        return self._buffers.get(rows, lambda: _Buffers(rows, self.widths, max(self.widths), self.n_classes,
                                                        self.dtype, self.device))

    def _loss_and_grad(self, z, idx, targets, shape, need_grad: bool):
        """(B,) float32 mean cross-entropy over K points, and (B, D) d loss_b / d z_b (None unless need_grad)."""
        loss, g0, gr = self._run(z, idx, targets, shape, need_grad)
        scale = 1.0 / idx.shape[1]
        grad = (g0 @ self.W0z + gr @ self.Wrz).mul_(scale) if need_grad else None
        return loss.mul_(scale), grad

    def _run(self, z, idx, targets, shape, need_grad, point_out=None, class_out=None):
        """Every point, chunk by chunk: forward, cross-entropy, and with need_grad the backward to
        the pre-activations of layers 0 and r.

        z (B, D), idx (B, K, 3), targets (B, K). Returns (Σ_k CE (B,) float32, Σ_k δ0 (B, H0) and
        Σ_k δr (B, H_r) float32 or None). With point_out (B = 1) the per-point cross-entropies are
        written there (and the classes into class_out when given) instead.
        """
        dev = self.device
        B, K = idx.shape[:2]
        T0, Tr, rows = self._embedding_tables(z.to(dev, torch.float32), idx, shape)
        tgt = targets.to(dev, torch.long)
        loss = torch.zeros(B, dtype=torch.float32, device=dev)
        g0 = torch.zeros(B, self.W0z.shape[0], dtype=torch.float32, device=dev) if need_grad else None
        gr = torch.zeros(B, self.Wrz.shape[0], dtype=torch.float32, device=dev) if need_grad else None
        n = max(1, min(self.chunk or default_chunk(dev), K))
        bufs = self._bufs(n)
        for b in range(B):
            for p0 in range(0, K, n):
                p1 = min(p0 + n, K)
                h, logits = self._forward(bufs, T0, Tr, rows[b, p0:p1])
                lse = torch.logsumexp(logits, dim=1)
                t = tgt[b, p0:p1]
                ce = lse - logits.gather(1, t[:, None])[:, 0]
                if point_out is not None:
                    point_out[p0:p1] = ce
                    if class_out is not None:
                        class_out[p0:p1] = logits.argmax(1)
                    continue
                loss[b] += ce.sum()
                if need_grad:
                    self._backward(bufs, h, logits, lse, t, g0[b], gr[b])
        return loss, g0, gr

    def _embedding_tables(self, z, idx, shape):
        """The layer-0 and layer-r tables of this call and every point's three rows in them.

        The per-scan biases c0 = W0z z + b0 and c_r = W_rz z + b_r are folded into per-scan copies
        of the x rows; y and z rows are shared. Returns (T0 (B·X+Y+Z, H0), Tr (…, H_r)) float32 and
        rows (B, K, 3) int64.
        """
        dev = self.device
        B = z.shape[0]
        P0, Pr = self._axis_tables(shape)
        Sx, Sy, _ = shape
        c0 = torch.addmm(self.b0, z, self.W0z.t())                       # (B, H0)
        cr = torch.addmm(self.br, z, self.Wrz.t())                       # (B, H_r)
        T0 = torch.cat(((P0[:Sx][None] + c0[:, None]).reshape(B * Sx, -1), P0[Sx:]))
        Tr = torch.cat(((Pr[:Sx][None] + cr[:, None]).reshape(B * Sx, -1), Pr[Sx:]))
        rows = idx.to(dev, torch.long) + self._offsets.get((B, Sx, Sy), lambda: self._row_offsets(B, Sx, Sy))
        return T0, Tr, rows

    def _row_offsets(self, B, Sx, Sy):
        """(B, 1, 3) int64: where scan b's x, y and z rows start in the per-call tables (made once per
        batch size and grid, so a step copies nothing from the host)."""
        off = torch.tensor([[0, B * Sx, B * Sx + Sy]], dtype=torch.long).repeat(B, 1)
        off[:, 0] = torch.arange(B) * Sx
        return off[:, None].to(self.device)

    def _forward(self, bufs, T0, Tr, rows):
        """One chunk of m points (rows (m, 3)) through the hidden layers and the output layer.

        Returns (h, logits): the activations of every hidden layer ((m, width) in the compute
        dtype; their sign is the ReLU mask of the backward) and (m, C) float32 logits (a view of
        bufs.logits).
        """
        m = rows.shape[0]
        h = [t[:m] for t in bufs.h]
        # layer 0: three table rows summed, c0 included
        h[0] = _cast_into(h[0], F.embedding_bag(rows, T0, mode="sum").relu_())
        for i in range(1, self.n_hidden):
            if i == self.r:          # [h, z, γ]: the z and γ shares are three rows of Tr
                h[i] = _cast_into(h[i], F.embedding_bag(rows, Tr, mode="sum")).addmm_(h[i - 1], self.Wf[i])
            else:
                torch.addmm(self.bias[i], h[i - 1], self.Wf[i], out=h[i])
            h[i].relu_()
        logits = torch.addmm(self.bo, h[-1].float(), self.WoT, out=bufs.logits[:m])
        return h, logits

    def _backward(self, bufs, h, logits, lse, t, g0, gr):
        """δ = softmax − onehot down to layer 0 for one chunk; adds Σ δ0 into g0 (H0,) and Σ δr into
        gr (H_r,). Overwrites `logits`."""
        m = logits.shape[0]
        dl = torch.exp(logits.sub_(lse[:, None]))
        dl[bufs.rows[:m], t] -= 1.0
        dh = _cast_into(bufs.delta(0, m, self.widths[-1]), torch.mm(dl, self.Wo, out=bufs.dlast[:m]))
        k = 0
        for i in range(self.n_hidden - 1, -1, -1):
            _threshold_backward_(dh, h[i])                        # δa_i
            if i == self.r:
                gr += dh.sum(0, dtype=torch.float32)
            if i == 0:
                g0 += dh.sum(0, dtype=torch.float32)
                return
            k ^= 1
            dh = torch.mm(dh, self.Wg[i], out=bufs.delta(k, m, self.widths[i - 1]))
