"""The Triton kernels of :mod:`rnnkit.backends.triton_lstm` (imported on first use: importing Triton
takes a second, and ``TRITON_INTERPRET=1`` must be set before that for the CPU interpreter)."""

import triton
import triton.language as tl


@triton.jit
def tanh(a):  # noqa: ANN001, ANN202
    """tanh(a) as 2 sigmoid(2a) - 1 (triton.language has no tanh of its own everywhere)."""
    return 2 * tl.sigmoid(2 * a) - 1


@triton.jit
def forward(G, HS, CS, W, M, N, T, H: tl.constexpr, BB: tl.constexpr, BU: tl.constexpr,  # noqa: ANN001, ANN202
            BK: tl.constexpr, HAS_MASK: tl.constexpr, KEEP: tl.constexpr, PREC: tl.constexpr):
    """All steps of an LSTM's forward for rows p BB .. p BB + BB - 1 of the batch (program p).

    G (T, N, 4H): pre-activations in (x W_ih^T + b), the activated gates out when KEEP; HS, CS (T + 1,
    N, H): slot 0 the initial state in, slots 1.. every step's out; W: W_hh^T (H, 4H); M (T, N) int8
    masks, 0 past a sequence's end (HAS_MASK)."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    live = rows < N
    ks = tl.arange(0, BK)
    acc_t = G.dtype.element_ty
    for t in range(T):
        h_prev = HS + t * N * H
        c_prev = CS + t * N * H
        g_t = G + t * N * 4 * H
        for u0 in range(0, H, BU):
            u = u0 + tl.arange(0, BU)
            ok = live[:, None] & (u < H)[None, :]
            at = rows[:, None] * H + u[None, :]
            gp = g_t + rows[:, None] * (4 * H) + u[None, :]
            a_i = tl.load(gp, mask=ok, other=0.0)
            a_f = tl.load(gp + H, mask=ok, other=0.0)
            a_g = tl.load(gp + 2 * H, mask=ok, other=0.0)
            a_o = tl.load(gp + 3 * H, mask=ok, other=0.0)
            for k0 in range(0, H, BK):
                k = k0 + ks
                hk = tl.load(h_prev + rows[:, None] * H + k[None, :], mask=live[:, None] & (k < H)[None, :],
                             other=0.0)
                wp = W + k[:, None] * (4 * H) + u[None, :]
                wm = (k < H)[:, None] & (u < H)[None, :]
                # out_dtype as the accumulator's: Triton 3.6 (the GPU machines' version) assumes float32
                # and refuses a float64 accumulator, where 3.9 takes it from acc
                a_i = tl.dot(hk, tl.load(wp, mask=wm, other=0.0), a_i, input_precision=PREC, out_dtype=acc_t)
                a_f = tl.dot(hk, tl.load(wp + H, mask=wm, other=0.0), a_f, input_precision=PREC, out_dtype=acc_t)
                a_g = tl.dot(hk, tl.load(wp + 2 * H, mask=wm, other=0.0), a_g, input_precision=PREC, out_dtype=acc_t)
                a_o = tl.dot(hk, tl.load(wp + 3 * H, mask=wm, other=0.0), a_o, input_precision=PREC, out_dtype=acc_t)
            i = tl.sigmoid(a_i)
            f = tl.sigmoid(a_f)
            g = tanh(a_g)
            o = tl.sigmoid(a_o)
            c_old = tl.load(c_prev + at, mask=ok, other=0.0)
            c = f * c_old + i * g
            h = o * tanh(c)
            if HAS_MASK:  # past a sequence's end its state stays
                inside = (tl.load(M + t * N + rows, mask=live, other=0) != 0)[:, None]
                c = tl.where(inside, c, c_old)
                h = tl.where(inside, h, tl.load(h_prev + at, mask=ok, other=0.0))
            if KEEP:
                tl.store(gp, i, mask=ok)
                tl.store(gp + H, f, mask=ok)
                tl.store(gp + 2 * H, g, mask=ok)
                tl.store(gp + 3 * H, o, mask=ok)
            tl.store(HS + (t + 1) * N * H + at, h, mask=ok)
            tl.store(CS + (t + 1) * N * H + at, c, mask=ok)
        tl.debug_barrier()  # step t's h, written by all of the program's threads, is read by all at t + 1


@triton.jit
def recurrent_dh(D, W, rows, live, u, H: tl.constexpr, BB: tl.constexpr, BU: tl.constexpr,  # noqa: ANN001, ANN202
                 BK: tl.constexpr, PREC: tl.constexpr):
    """(BB, BU): rows of a step's gate gradients D (N, 4H) times columns u of W_hh (4H, H)."""
    acc = tl.zeros((BB, BU), dtype=D.dtype.element_ty)
    ks = tl.arange(0, BK)
    for k0 in range(0, 4 * H, BK):
        k = k0 + ks
        d = tl.load(D + rows[:, None] * (4 * H) + k[None, :], mask=live[:, None] & (k < 4 * H)[None, :], other=0.0)
        w = tl.load(W + k[:, None] * H + u[None, :], mask=(k < 4 * H)[:, None] & (u < H)[None, :], other=0.0)
        acc = tl.dot(d, w, acc, input_precision=PREC, out_dtype=D.dtype.element_ty)  # see forward
    return acc


@triton.jit
def backward(G, DG, CS, GH, GC, W, M, DH, DC, DH0, N, T, H: tl.constexpr, BB: tl.constexpr,  # noqa: ANN001, ANN202
             BU: tl.constexpr, BK: tl.constexpr, HAS_GH: tl.constexpr, HAS_GC: tl.constexpr,
             HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    """All steps of an LSTM's backward for program p's rows of the batch, the last step first.

    G (T, N, 4H) activated gates; DG (T, N, 4H) their gradients out; CS (T + 1, N, H) as the forward
    left it; GH, GC (T, N, H) the gradients of every step's h and c; W: W_hh (4H, H); DH (N, H)
    scratch (d loss / d h_t of a row frozen at t, passed down); DC (N, H) zeros in, dc0 out; DH0
    (N, H) d loss / d h0 out."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    live = rows < N
    for s in range(T):
        t = T - 1 - s
        for u0 in range(0, H, BU):
            u = u0 + tl.arange(0, BU)
            ok = live[:, None] & (u < H)[None, :]
            at = rows[:, None] * H + u[None, :]
            dh = tl.zeros((BB, BU), dtype=G.dtype.element_ty)
            if HAS_GH:
                dh += tl.load(GH + t * N * H + at, mask=ok, other=0.0)
            if s > 0:
                dh += recurrent_dh(DG + (t + 1) * N * 4 * H, W, rows, live, u, H, BB, BU, BK, PREC)
                if HAS_MASK:  # a row frozen at t + 1 passes its whole dh down
                    above = (tl.load(M + (t + 1) * N + rows, mask=live, other=0) != 0)[:, None]
                    dh += tl.where(above, 0.0, tl.load(DH + at, mask=ok, other=0.0))
            dc = tl.load(DC + at, mask=ok, other=0.0)
            if HAS_GC:
                dc += tl.load(GC + t * N * H + at, mask=ok, other=0.0)
            gp = G + t * N * 4 * H + rows[:, None] * (4 * H) + u[None, :]
            i = tl.load(gp, mask=ok, other=0.0)
            f = tl.load(gp + H, mask=ok, other=0.0)
            g = tl.load(gp + 2 * H, mask=ok, other=0.0)
            o = tl.load(gp + 3 * H, mask=ok, other=0.0)
            tc = tanh(tl.load(CS + (t + 1) * N * H + at, mask=ok, other=0.0))
            c_old = tl.load(CS + t * N * H + at, mask=ok, other=0.0)
            dcs = dc + dh * o * (1 - tc * tc)
            d_i = dcs * g * i * (1 - i)
            d_f = dcs * c_old * f * (1 - f)
            d_g = dcs * i * (1 - g * g)
            d_o = dh * tc * o * (1 - o)
            below = dcs * f
            if HAS_MASK:  # frozen: no gradient into the gates; dc and dh pass straight down
                inside = (tl.load(M + t * N + rows, mask=live, other=0) != 0)[:, None]
                d_i = tl.where(inside, d_i, 0.0)
                d_f = tl.where(inside, d_f, 0.0)
                d_g = tl.where(inside, d_g, 0.0)
                d_o = tl.where(inside, d_o, 0.0)
                below = tl.where(inside, below, dc)
                tl.store(DH + at, dh, mask=ok)
            dp = DG + t * N * 4 * H + rows[:, None] * (4 * H) + u[None, :]
            tl.store(dp, d_i, mask=ok)
            tl.store(dp + H, d_f, mask=ok)
            tl.store(dp + 2 * H, d_g, mask=ok)
            tl.store(dp + 3 * H, d_o, mask=ok)
            tl.store(DC + at, below, mask=ok)
        tl.debug_barrier()  # step t's gate gradients are read by all of the program's threads at t - 1
    for u0 in range(0, H, BU):  # d loss / d h0 (every sequence has step 0: none is frozen there)
        u = u0 + tl.arange(0, BU)
        dh = recurrent_dh(DG, W, rows, live, u, H, BB, BU, BK, PREC)
        tl.store(DH0 + rows[:, None] * H + u[None, :], dh, mask=live[:, None] & (u < H)[None, :])
