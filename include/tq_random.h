/* Machine-independent Gaussian numbers and Haar-random orthogonal matrices.
 *
 * Everything here is a fixed sequence of IEEE-754 double additions,
 * subtractions, multiplications, divisions and square roots (each correctly
 * rounded by the standard), exact integer operations and the exact frexp, in
 * an order the source fixes: no libm log/exp/sin/cos (whose last bit differs
 * between C libraries and CPUs), inner loops that are element-wise axpy
 * updates (which vectorize without changing a bit; the one sum, a column's
 * squared norm, runs in order, as compilers keep it without -ffast-math), and
 * no FMA contraction (setup.py builds with -ffp-contract=off). So every machine
 * with IEEE-754 doubles computes the same bits.
 *
 * tq_standard_normal_from_raw: standard normals from raw 64-bit words by
 *     Marsaglia's polar method, with tq_log below.
 * tq_haar_orthogonal: the Haar-distributed orthogonal factor of a Gaussian
 *     matrix, by Householder QR with the signs of R's diagonal moved into Q.
 */
#ifndef TQ_RANDOM_H
#define TQ_RANDOM_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "tq_tile.h"

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* ln 2 split so that e * TQ_LN2_HI is exact for |e| < 2**11 (fdlibm's constants). */
#define TQ_LN2_HI 6.93147180369123816490e-01
#define TQ_LN2_LO 1.90821492927058770002e-10

/* Natural logarithm of a positive normal double, within 3 ulps, from
 * + - * / only: x = m 2**e with sqrt(1/2) <= m < sqrt(2) (frexp is exact), then
 * log m = 2 atanh(t), t = (m - 1)/(m + 1), |t| < 0.1716, by the series
 * 2 (t + t**3/3 + ... + t**23/23), whose first omitted term is below 1e-19 t. */
static inline double tq_log(double x)
{
    int e;
    double m = frexp(x, &e);
    if (m < 0.70710678118654752440) {
        m = 2.0 * m;
        e -= 1;
    }
    const double t = (m - 1.0) / (m + 1.0);
    const double t2 = t * t;
    double p = 1.0 / 23.0;
    for (int k = 21; k >= 1; k -= 2)
        p = 1.0 / (double)k + t2 * p;
    const double log_m = 2.0 * t * p;
    return ((double)e * TQ_LN2_LO + log_m) + (double)e * TQ_LN2_HI;
}

/* The uniform number ((w >> 11) - 2**52) / 2**52 in [-1, 1) (exact). */
static inline double tq_symmetric_uniform(uint64_t w)
{
    return ((double)(int64_t)(w >> 11) - 4503599627370496.0) * (1.0 / 4503599627370496.0);
}

/* Standard normals by Marsaglia's polar method.
 *
 * Consumes the words in pairs (words[2i], words[2i + 1]) -> (u, v), uniform on
 * [-1, 1); a pair with s = u*u + v*v in (0, 1) gives the two normals
 * u f, v f with f = sqrt(-2 log(s) / s), in that order; other pairs are skipped.
 * Writes at most n_out values (dropping the second of a pair that does not
 * fit) and returns how many it wrote; n_words must be even. Calling again with
 * the following words continues the same sequence. */
static inline ptrdiff_t tq_standard_normal_from_raw(const uint64_t *words, ptrdiff_t n_words,
                                                   double *out, ptrdiff_t n_out)
{
    ptrdiff_t written = 0;
    for (ptrdiff_t i = 0; i + 1 < n_words && written < n_out; i += 2) {
        const double u = tq_symmetric_uniform(words[i]);
        const double v = tq_symmetric_uniform(words[i + 1]);
        const double s = u * u + v * v;
        if (s >= 1.0 || s == 0.0)
            continue;
        const double f = sqrt(-2.0 * tq_log(s) / s);
        out[written++] = u * f;
        if (written < n_out)
            out[written++] = v * f;
    }
    return written;
}

/* y[j] += c x[j] and y[j] -= c x[j], j < n: element-wise, so any vectorization gives the same bits. */
TQ_INLINE void tq_axpy(double *y, double c, const double *x, ptrdiff_t n)
{
    for (ptrdiff_t j = 0; j < n; j++)
        y[j] += c * x[j];
}

TQ_INLINE void tq_axmy(double *y, double c, const double *x, ptrdiff_t n)
{
    for (ptrdiff_t j = 0; j < n; j++)
        y[j] -= c * x[j];
}

/* Householder reflector H = I - tau v v^T of column k (rows k..d-1) of the
 * row-major (d, d) matrix `a`, LAPACK's dlarfg: H maps the column onto
 * (beta, 0, ..., 0) with beta = -sign(alpha) ||column||; v = (1, a[i, k] / (alpha - beta))
 * is stored below the diagonal and beta on it. Sets *tau and *sign_r = sign(R_kk). */
TQ_INLINE void tq_reflector(double *a, ptrdiff_t d, ptrdiff_t k, double *tau, double *sign_r)
{
    const double alpha = a[k * d + k];
    double below = 0.0;
    for (ptrdiff_t i = k + 1; i < d; i++)
        below += a[i * d + k] * a[i * d + k];
    if (below == 0.0) {
        *tau = 0.0;
        *sign_r = alpha < 0.0 ? -1.0 : 1.0;
        return;
    }
    const double norm = sqrt(alpha * alpha + below);
    const double beta = alpha < 0.0 ? norm : -norm;
    const double scale = 1.0 / (alpha - beta);
    *tau = (beta - alpha) / beta;
    *sign_r = beta < 0.0 ? -1.0 : 1.0;
    a[k * d + k] = beta;
    for (ptrdiff_t i = k + 1; i < d; i++)
        a[i * d + k] *= scale;
}

/* In place, the (d, d) row-major matrix `a` (Gaussian) becomes Q diag(sign(diag R))
 * with a = Q R its Householder QR (LAPACK's dgeqr2, then dorg2r to form Q).
 * Every inner loop runs along a row. Each step's update of the trailing rows is
 * fused with the next step's product s = v^T A, which needs those rows
 * updated, so the trailing matrix is read once per step. `work` holds 4 d doubles. */
TQ_INLINE void tq_haar_orthogonal_body(int variant, double *a, ptrdiff_t d, double *work)
{
    double *tau = work, *sign_r = work + d, *s = work + 2 * d, *s_next = work + 3 * d;
    (void)variant;
    if (d == 0)
        return;
    /* Factor. Step k applies H_k to columns k+1.. with s = v_k^T A[k:, k+1:]. */
    tq_reflector(a, d, 0, &tau[0], &sign_r[0]);
    for (ptrdiff_t j = 1; j < d; j++)
        s[j] = a[j];
    for (ptrdiff_t i = 1; i < d; i++)
        tq_axpy(s + 1, a[i * d], a + i * d + 1, d - 1);
    for (ptrdiff_t k = 0; k + 1 < d; k++) {
        const double t = tau[k];
        const ptrdiff_t c0 = k + 2, width = d - c0;
        tq_axmy(a + k * d + k + 1, t, s + k + 1, d - k - 1);  /* row k, v_k[k] = 1 */
        for (ptrdiff_t i = k + 1; i < d; i++)                  /* column k + 1 first */
            a[i * d + k + 1] -= (t * a[i * d + k]) * s[k + 1];
        tq_reflector(a, d, k + 1, &tau[k + 1], &sign_r[k + 1]);
        for (ptrdiff_t i = k + 1; i < d; i++) {
            double *row = a + i * d + c0;
            tq_axmy(row, t * a[i * d + k], s + c0, width);
            if (i == k + 1)
                for (ptrdiff_t j = 0; j < width; j++)
                    s_next[c0 + j] = row[j];
            else
                tq_axpy(s_next + c0, a[i * d + k + 1], row, width);
        }
        double *swap = s;
        s = s_next;
        s_next = swap;
    }
    /* Form Q = H_0 H_1 ... H_(d-1) backwards (dorg2r). When H_k is applied, rows
     * and columns > k hold the product of the later reflectors, row k right of
     * the diagonal is zero, and s = v_k^T A[k+1:, k+1:] (from the previous step). */
    for (ptrdiff_t k = d - 1; k >= 0; k--) {
        const double t = tau[k];
        const ptrdiff_t width = d - k - 1;
        a[k * d + k] = 1.0 - t;
        for (ptrdiff_t j = 0; j < width; j++)
            a[k * d + k + 1 + j] = -t * s[k + 1 + j];
        if (k > 0) {
            for (ptrdiff_t j = k; j < d; j++)
                s_next[j] = 0.0;
            tq_axpy(s_next + k, a[k * d + k - 1], a + k * d + k, width + 1);
        }
        for (ptrdiff_t i = k + 1; i < d; i++) {
            tq_axmy(a + i * d + k + 1, t * a[i * d + k], s + k + 1, width);
            a[i * d + k] = -t * a[i * d + k];
            if (k > 0)
                tq_axpy(s_next + k, a[i * d + k - 1], a + i * d + k, width + 1);
        }
        for (ptrdiff_t i = 0; i < k; i++)
            a[i * d + k] = 0.0;
        double *swap = s;
        s = s_next;
        s_next = swap;
    }
    /* Haar: the Q of the R with positive diagonal. */
    for (ptrdiff_t i = 0; i < d; i++)
        for (ptrdiff_t j = 0; j < d; j++)
            a[i * d + j] *= sign_r[j];
}

TQ_DEFINE_VARIANTS(tq_haar_orthogonal, (int variant, double *a, ptrdiff_t d, double *work),
                   (variant, a, d, work))

#endif /* TQ_RANDOM_H */
