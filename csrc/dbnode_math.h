/* Vectorizable exp for the activation kernels.
 *
 * glibc's expf/exp are scalar calls that stop a loop from vectorizing
 * (GCC only substitutes libmvec's vector versions under -ffast-math, which
 * we refuse: it changes IEEE semantics for the whole module). These are
 * branch-free inline functions, so loops that call them vectorize at -O3.
 *
 * Method: exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n*ln2 with ln2
 * split in two (Cody-Waite) so r is exact to working precision, |r| <= ln2/2.
 * exp(r) is its Taylor series to the degree where the next term is below
 * half an ulp (7 for float, 13 for double). 2^n is applied as two factors
 * 2^(n/2) * 2^(n - n/2), each a normal number built from its exponent bits,
 * so overflow to inf and gradual underflow to 0 come out as IEEE says.
 * Accuracy: within a few ulp of the correctly rounded result.
 */
#ifndef DBNODE_MATH_H
#define DBNODE_MATH_H

#include <stdint.h>
#include <string.h>

static inline float dbn_pow2f(int32_t n) {  /* 2^n for n in [-126, 127] */
    int32_t bits = (n + 127) << 23;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float dbn_expf(float x) {
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    /* Outside [-104, 89] the result is 0 or inf anyway; clamping keeps n
       within int range. NaN fails both comparisons and is restored below. */
    float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
    /* Round to nearest by the 1.5 * 2^23 trick: no libm call. */
    float n = (xc * log2e + 12582912.0f) - 12582912.0f;
    float r = (xc - n * ln2_hi) - n * ln2_lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t ni = (int32_t)n, n1 = ni >> 1;
    float y = p * dbn_pow2f(n1) * dbn_pow2f(ni - n1);
    return x != x ? x : y;
}

static inline double dbn_pow2(int32_t n) {  /* 2^n for n in [-1022, 1023] */
    int64_t bits = (int64_t)(n + 1023) << 52;
    double f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline double dbn_exp(double x) {
    const double log2e = 1.4426950408889634074;
    const double ln2_hi = 6.93145751953125e-1, ln2_lo = 1.42860682030941723212e-6;
    double xc = x < -746.0 ? -746.0 : (x > 710.0 ? 710.0 : x);
    double n = (xc * log2e + 6755399441055744.0) - 6755399441055744.0;
    double r = (xc - n * ln2_hi) - n * ln2_lo;
    double p = 1.0 / 6227020800.0;          /* 1/13! */
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int32_t ni = (int32_t)n, n1 = ni >> 1;
    double y = p * dbn_pow2(n1) * dbn_pow2(ni - n1);
    return x != x ? x : y;
}

#endif
