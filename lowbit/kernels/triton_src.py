"""The Triton kernel source behind `lowbit.kernels.triton_gemm` (imported only when Triton is
installed; kept at module level so Triton's interpreter can patch ``tl`` in its globals)."""

import triton
import triton.language as tl

@triton.jit
def load_codes(q_ptr, offs_n, n_ok, k0, KB, stride_qn, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes of columns k0 .. k0 + BLOCK_K of rows offs_n as a (BLOCK_N, BLOCK_K) uint8 tile, read
    row-major so that the loads coalesce. At 4 bits byte i holds columns 2i (low nibble) and
    2i + 1 (high nibble): join the two nibble tiles on a new last axis and flatten it."""
    if BITS == 4:
        byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(q_ptr + offs_n[:, None] * stride_qn + byte[None, :], mask=n_ok[:, None] & (byte[None, :] < KB), other=0)
        codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (offs_n.shape[0], BLOCK_K))
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        codes = tl.load(q_ptr + offs_n[:, None] * stride_qn + k[None, :], mask=n_ok[:, None] & (k[None, :] < KB), other=0)
    return codes


@triton.jit
def wq_gemm(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, K, KB, stride_xm, stride_qn, stride_ym, M_BUCKET,
            GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # x: (M, K) activations; q: (N, KB) uint8 codes; s, b: (n_groups, N) scale and offset
    # (transposed so a chunk's scales are one contiguous row); y: (M, N). W = q S + B.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        codes = load_codes(q_ptr, offs_n, n_ok, k0, KB, stride_qn, BITS, BLOCK_K).to(tl.float32)
        if GROUP % BLOCK_K == 0:  # the whole chunk lies in one group
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)[:, None]
            b = tl.load(b_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)[:, None]
        else:  # groups shorter than the chunk or not aligned to it: a scale per column
            gk = tl.minimum(k, K - 1) // GROUP
            s = tl.load(s_ptr + gk[None, :] * N + offs_n[:, None], mask=n_ok[:, None], other=0).to(tl.float32)
            b = tl.load(b_ptr + gk[None, :] * N + offs_n[:, None], mask=n_ok[:, None], other=0).to(tl.float32)
        w = (codes * s + b).to(x_ptr.dtype.element_ty)
        xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k[None, :] < K), other=0)
        acc += tl.dot(xk, tl.trans(w))
    out = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def scaled_row_dot(codes, xk, k, k0, K, N, offs_n, n_ok, s_ptr, b_ptr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k (q S + B) x over one chunk for each row: codes (BLOCK_N, BLOCK_K) float32 in column
    order k, xk (BLOCK_K,) float32. Inside one group, S sum q x + B sum x; else a scale per column."""
    if GROUP % BLOCK_K == 0:
        g = k0 // GROUP
        s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)
        b = tl.load(b_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)
        part = s * tl.sum(codes * xk[None, :], axis=1) + b * tl.sum(xk, axis=0)
    else:
        gk = tl.minimum(k, K - 1) // GROUP
        s = tl.load(s_ptr + gk[None, :] * N + offs_n[:, None], mask=n_ok[:, None], other=0).to(tl.float32)
        b = tl.load(b_ptr + gk[None, :] * N + offs_n[:, None], mask=n_ok[:, None], other=0).to(tl.float32)
        part = tl.sum((codes * s + b) * xk[None, :], axis=1)
    return part


@triton.jit
def wq_gemv(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, N, K, KB, stride_qn,
            GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # one token, on the CUDA cores (no padding of the token dimension to the tensor cores' 16
    # rows). Where a chunk lies in one group, sum_k (q S + B) x = S sum_k q x + B sum_k x.
    # At 4 bits the nibbles are not interleaved (a layout shuffle): x is read as its even
    # columns (low nibbles) and odd columns (high nibbles) instead.
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if BITS == 4:
        HALF: tl.constexpr = BLOCK_K // 2
        offs_p = tl.arange(0, HALF)
        for k0 in range(0, K, BLOCK_K):
            byte = k0 // 2 + offs_p
            codes = tl.load(q_ptr + offs_n[:, None] * stride_qn + byte[None, :], mask=n_ok[:, None] & (byte[None, :] < KB), other=0)
            k_even = k0 + 2 * offs_p
            k_odd = k_even + 1
            x_even = tl.load(x_ptr + k_even, mask=k_even < K, other=0).to(tl.float32)
            x_odd = tl.load(x_ptr + k_odd, mask=k_odd < K, other=0).to(tl.float32)
            lo = (codes & 0xF).to(tl.float32)
            hi = (codes >> 4).to(tl.float32)
            if GROUP % BLOCK_K == 0:
                g = k0 // GROUP
                s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)
                b = tl.load(b_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)
                qx = tl.sum(lo * x_even[None, :] + hi * x_odd[None, :], axis=1)
                acc += s * qx + b * (tl.sum(x_even, axis=0) + tl.sum(x_odd, axis=0))
            else:
                ge = tl.minimum(k_even, K - 1) // GROUP
                go = tl.minimum(k_odd, K - 1) // GROUP
                s = tl.load(s_ptr + ge[None, :] * N + offs_n[:, None], mask=n_ok[:, None], other=0).to(tl.float32)
                b = tl.load(b_ptr + ge[None, :] * N + offs_n[:, None], mask=n_ok[:, None], other=0).to(tl.float32)
                s_hi = tl.load(s_ptr + go[None, :] * N + offs_n[:, None], mask=n_ok[:, None], other=0).to(tl.float32)
                b_hi = tl.load(b_ptr + go[None, :] * N + offs_n[:, None], mask=n_ok[:, None], other=0).to(tl.float32)
                acc += tl.sum((lo * s + b) * x_even[None, :] + (hi * s_hi + b_hi) * x_odd[None, :], axis=1)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K
            codes = tl.load(q_ptr + offs_n[:, None] * stride_qn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
            xk = tl.load(x_ptr + k, mask=k_ok, other=0).to(tl.float32)
            acc += scaled_row_dot(codes, xk, k, k0, K, N, offs_n, n_ok, s_ptr, b_ptr, GROUP, BLOCK_K)
    tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def wq_gemv_words(x_ptr, qw_ptr, s_ptr, b_ptr, y_ptr, N, K, KW, stride_qw,
                  GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One token, 4-bit codes read as int32 words (qw: (N, K/8), K % 8 == 0): word j of a row
    # holds columns 8j..8j+7, column 8j+p at bits 4p, so shifting each word by 0, 4, ..., 28
    # and masking lays a (BLOCK_N, BLOCK_K/8, 8) tile out in column order: the activations
    # are read contiguously and each thread's load is whole words (the CPU kernel's block
    # path, docs/inference.md). The even/odd kernel above reads bytes and splits x instead;
    # which is faster is measured per shape on the GPU (triton_gemm.wq_gemm).
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    WORDS: tl.constexpr = BLOCK_K // 8
    offs_w = tl.arange(0, WORDS)
    shifts = tl.arange(0, 8) * 4
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        word = k0 // 8 + offs_w
        words = tl.load(qw_ptr + offs_n[:, None] * stride_qw + word[None, :], mask=n_ok[:, None] & (word[None, :] < KW), other=0)
        codes = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 0xF, (BLOCK_N, BLOCK_K)).to(tl.float32)
        k = k0 + offs_k
        k_ok = k < K
        xk = tl.load(x_ptr + k, mask=k_ok, other=0).to(tl.float32)
        acc += scaled_row_dot(codes, xk, k, k0, K, N, offs_n, n_ok, s_ptr, b_ptr, GROUP, BLOCK_K)
    tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)

configs = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bk, w, st in [(16, 128, 4, 3), (16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (32, 256, 4, 4),
                          (64, 128, 4, 3), (64, 256, 8, 3), (16, 512, 4, 2), (32, 512, 8, 2), (128, 128, 8, 3)]
]
tuned = triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "GROUP", "BITS"])(wq_gemm)

gemv_configs = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bk, w, st in [(8, 256, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 8, 3),
                          (64, 256, 8, 3), (8, 1024, 4, 2), (16, 1024, 8, 2), (4, 1024, 4, 3), (32, 128, 4, 4), (8, 2048, 8, 2), (4, 2048, 4, 2)]
]
tuned_gemv = triton.autotune(configs=gemv_configs, key=["N", "K", "GROUP", "BITS"])(wq_gemv)

tuned_gemv_words = triton.autotune(configs=gemv_configs, key=["N", "K", "GROUP"])(wq_gemv_words)
