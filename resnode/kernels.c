/* The per-layer loops of resnode.engine, compiled for one state dimension Q, one hidden width M
 * and one scalar type REAL (given as -DQ=.. -DM=.. -DREAL=float|double by resnode/native.py).
 *
 * At the sizes of the book (n ~ 100 rows, Q ~ 16, M ~ 32) one layer is a few thousand
 * multiply-adds: library calls cost more than the arithmetic. Here the whole depth loop runs in C,
 * with both small matrix products unrolled for the known Q and M, and the activation vectorised
 * through the C library's SIMD variants of erf, tanh, exp and log1p (glibc's libmvec).
 *
 * Layouts (all contiguous, S independent networks side by side):
 *   states  (L + 1, S, n, Q)      pres, acts  (L, S, n, M)      g  (S, n, Q)
 *   Wt  (L, S, Q, M) = inner W^T  (forward)      Wi  (L, S, M, Q) = inner W  (backward)
 *   V kind 0: V^T (L, S, M, Q) forward, V (L, S, Q, M) backward, both times step outer
 *   V kind 1: one scalar per layer and network (L, S), times step outer (M = Q)
 *   V kind 2: no V (M = Q); the update is step outer sigma(p).
 * The weight gradients gW, gV, gb have the shapes of W, V, b.
 */
#include <math.h>
#include <stddef.h>

#ifdef REAL_IS_DOUBLE
#define FN(name) name
#else
#define FN(name) name##f
#endif

#if defined(__GNUC__) && !defined(__clang__)
/* Declaring the SIMD variants lets the compiler vectorise these calls (glibc's math-vector.h
 * declares them only under -ffast-math, whose other effects we do not want). */
#define SIMD __attribute__((simd("notinbranch")))
SIMD REAL FN(erf)(REAL);
SIMD REAL FN(tanh)(REAL);
SIMD REAL FN(exp)(REAL);
SIMD REAL FN(log1p)(REAL);
SIMD REAL FN(expm1)(REAL);
#endif

enum { TANH, RELU, GELU, SOFTPLUS, SIGMOID, IDENTITY };
enum { V_MATRIX, V_SCALAR, V_NONE };

/* out (n, M) = x (n, Q) B (Q, M) [+ bias (M)] */
static void times_QM(int n, const REAL *restrict x, const REAL *restrict B, const REAL *restrict bias,
                     REAL *restrict out) {
    for (int i = 0; i < n; i++) {
        REAL *restrict row = out + (size_t)i * M;
#pragma omp simd
        for (int j = 0; j < M; j++) row[j] = bias ? bias[j] : 0;
#pragma GCC unroll 4
        for (int l = 0; l < Q; l++) {
            const REAL xl = x[(size_t)i * Q + l];
            const REAL *restrict Bl = B + (size_t)l * M;
#pragma omp simd
            for (int j = 0; j < M; j++) row[j] += xl * Bl[j];
        }
    }
}

/* out (n, Q) += a (n, M) B (M, Q). The product is summed apart and added once, as BLAS does: summing
 * each term into out directly would round M times at the scale of out (a state), not of the update. */
static void add_times_MQ(int n, const REAL *restrict a, const REAL *restrict B, REAL *restrict out) {
    for (int i = 0; i < n; i++) {
        REAL acc[Q] = {0};
#pragma GCC unroll 4
        for (int j = 0; j < M; j++) {
            const REAL aj = a[(size_t)i * M + j];
            const REAL *restrict Bj = B + (size_t)j * Q;
#pragma omp simd
            for (int l = 0; l < Q; l++) acc[l] += aj * Bj[l];
        }
        REAL *restrict row = out + (size_t)i * Q;
#pragma omp simd
        for (int l = 0; l < Q; l++) row[l] += acc[l];
    }
}

/* rows r0 .. r0 + rows - 1 (rows <= 4) of out (R, C) = scale * sum_i x_i^T y_i, over the n rows of x (n, R)
 * and y (n, C); the partial sums stay in registers */
static inline __attribute__((always_inline)) void outer_rows(int rows, int r0, int n, int R, int C, REAL scale,
                                                             const REAL *restrict x, const REAL *restrict y,
                                                             REAL *restrict out) {
    REAL acc[4][Q > M ? Q : M] = {{0}};
    for (int i = 0; i < n; i++) {
        const REAL *restrict yi = y + (size_t)i * C;
        for (int r = 0; r < rows; r++) {
            const REAL xr = x[(size_t)i * R + r0 + r];
#pragma omp simd
            for (int t = 0; t < C; t++) acc[r][t] += xr * yi[t];
        }
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < C; t++) out[(size_t)(r0 + r) * C + t] = scale * acc[r][t];
}

/* out (R, C) = scale * sum_i x_i^T y_i, four rows of out at a time */
static void sum_outer(int n, int R, int C, REAL scale, const REAL *restrict x, const REAL *restrict y,
                      REAL *restrict out) {
    int r0 = 0;
    for (; r0 + 4 <= R; r0 += 4) outer_rows(4, r0, n, R, C, scale, x, y, out);
    for (; r0 < R; r0++) outer_rows(1, r0, n, R, C, scale, x, y, out);
}

/* Asks the cache for the lines of x[0 .. size) ahead of their use: the backward pass walks the layers
 * downwards, which the hardware prefetchers do not follow on their own. */
static inline void prefetch(const REAL *x, size_t size) {
    for (size_t t = 0; t < size; t += 64 / sizeof(REAL)) __builtin_prefetch(x + t);
}

/* a = sigma(p) elementwise (a may be p), with torch's definitions (softplus: beta 1, threshold 20) */
static void activate(int kind, size_t size, const REAL *p, REAL *a) {
    const REAL half = 0.5, one = 1, zero = 0, root_half = (REAL)0.70710678118654752440;
    switch (kind) {
    case TANH:
#pragma omp simd
        for (size_t t = 0; t < size; t++) a[t] = FN(tanh)(p[t]);
        break;
    case RELU:  /* NaN passes through, as in torch.relu */
#pragma omp simd
        for (size_t t = 0; t < size; t++) a[t] = p[t] < zero ? zero : p[t];
        break;
    case GELU:
#pragma omp simd
        for (size_t t = 0; t < size; t++) a[t] = p[t] * half * (one + FN(erf)(p[t] * root_half));
        break;
    case SOFTPLUS:
#pragma omp simd
        for (size_t t = 0; t < size; t++) a[t] = p[t] > 20 ? p[t] : FN(log1p)(FN(exp)(p[t]));
        break;
    case SIGMOID:
#pragma omp simd
        for (size_t t = 0; t < size; t++) a[t] = one / (one + FN(exp)(-p[t]));
        break;
    default:
        if (a != p)
            for (size_t t = 0; t < size; t++) a[t] = p[t];
    }
}

/* p *= sigma'(pre) elementwise, from the activation a = sigma(pre) where it suffices (torch's formulas) */
static void times_slope(int kind, size_t size, const REAL *restrict pre, const REAL *restrict a, REAL *restrict p) {
    const REAL half = 0.5, one = 1, zero = 0, root_half = (REAL)0.70710678118654752440,
               gauss = (REAL)0.39894228040143267794;  /* 1 / sqrt(2 pi) */
    switch (kind) {
    case TANH:
#pragma omp simd
        for (size_t t = 0; t < size; t++) p[t] *= one - a[t] * a[t];
        break;
    case RELU:
#pragma omp simd
        for (size_t t = 0; t < size; t++) p[t] *= a[t] > zero ? one : zero;
        break;
    case GELU:
#pragma omp simd
        for (size_t t = 0; t < size; t++)
            p[t] *= half * (one + FN(erf)(pre[t] * root_half)) + pre[t] * gauss * FN(exp)(-half * pre[t] * pre[t]);
        break;
    case SOFTPLUS:
#pragma omp simd
        for (size_t t = 0; t < size; t++) p[t] *= -FN(expm1)(-a[t]);
        break;
    case SIGMOID:
#pragma omp simd
        for (size_t t = 0; t < size; t++) p[t] *= a[t] - a[t] * a[t];
        break;
    default:
        break;
    }
}

/* h_{k+1} = h_k + V_k sigma(W_k h_k + b_k), k < L: fills states[1..L], acts and (if given) pres. */
void resnode_forward(int L, int S, int n, int activation, int v_kind, REAL c, const REAL *Wt, const REAL *b,
                     const REAL *V, REAL *states, REAL *pres, REAL *acts) {
    const size_t sq = (size_t)n * Q, sm = (size_t)n * M;
    for (size_t ks = 0; ks < (size_t)L * S; ks++) {  /* layer k = ks / S, network s = ks % S */
        const REAL *h = states + ks * sq;
        REAL *next = states + (ks + S) * sq, *a = acts + ks * sm, *p = pres ? pres + ks * sm : a;
        times_QM(n, h, Wt + ks * Q * M, b ? b + ks * M : NULL, p);
        activate(activation, sm, p, a);
        if (v_kind == V_MATRIX) {
#pragma omp simd
            for (size_t t = 0; t < sq; t++) next[t] = h[t];
            add_times_MQ(n, a, V + ks * M * Q, next);
        } else {
            const REAL v = v_kind == V_SCALAR ? V[ks] : c;
#pragma omp simd
            for (size_t t = 0; t < sq; t++) next[t] = h[t] + v * a[t];  /* M = Q */
        }
    }
}

/* The gradients of a loss whose gradient in h_L is g (S, n, Q), by the reverse recursion
 *   p_k = (V_k^T g_{k+1}) * sigma'(pre_k),   g_k = g_{k+1} + inner W_k^T p_k,
 *   dV_k = g_{k+1}^T sigma(pre_k) (scalar V: their dot product),  dW_k = inner p_k^T h_k,  db_k = sum_i p_k,
 * with V already times step outer; g is overwritten by g_0. scratch holds one p (n, M). */
void resnode_backward(int L, int S, int n, int activation, int v_kind, REAL c, REAL inner, const REAL *Wi,
                      const REAL *V, const REAL *states, const REAL *pres, const REAL *acts, REAL *g,
                      REAL *scratch, REAL *gW, REAL *gV, REAL *gb) {
    const size_t sq = (size_t)n * Q, sm = (size_t)n * M;
    REAL *restrict p = scratch;
    for (size_t ks = (size_t)L * S; ks-- > 0;) {  /* layer k = ks / S, network s = ks % S */
        REAL *restrict gs = g + (ks % S) * sq;
        const REAL *a = acts + ks * sm;
        if (ks >= (size_t)S) {  /* the next layer down, while this one computes */
            prefetch(acts + (ks - S) * sm, sm);
            prefetch(states + (ks - S) * sq, sq);
            if (pres) prefetch(pres + (ks - S) * sm, sm);
            prefetch(Wi + (ks - S) * M * Q, M * Q);
            if (v_kind == V_MATRIX) prefetch(V + (ks - S) * Q * M, Q * M);
        }
        if (v_kind == V_MATRIX) {
            sum_outer(n, Q, M, c, gs, a, gV + ks * Q * M);
            times_QM(n, gs, V + ks * Q * M, NULL, p);
        } else {  /* M = Q */
            const REAL v = v_kind == V_SCALAR ? V[ks] : c;
            REAL dot = 0;
#pragma omp simd reduction(+ : dot)
            for (size_t t = 0; t < sm; t++) {
                dot += gs[t] * a[t];
                p[t] = v * gs[t];
            }
            if (v_kind == V_SCALAR) gV[ks] = c * dot;
        }
        times_slope(activation, sm, pres ? pres + ks * sm : NULL, a, p);
        sum_outer(n, M, Q, inner, p, states + ks * sq, gW + ks * M * Q);
        if (gb) {
            REAL *restrict bias = gb + ks * M;
            for (int j = 0; j < M; j++) bias[j] = 0;
            for (int i = 0; i < n; i++)
#pragma omp simd
                for (int j = 0; j < M; j++) bias[j] += p[(size_t)i * M + j];
        }
        add_times_MQ(n, p, Wi + ks * M * Q, gs);
    }
}
