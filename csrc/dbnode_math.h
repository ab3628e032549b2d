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

/* Wire codecs: float32 <-> bfloat16 and float16, as the bits the frames carry.
 *
 * bfloat16 is the top half of a binary32; float16 is IEEE binary16. Both
 * encoders round to nearest, ties to even, and saturate: a finite value too
 * large for the format becomes its largest finite value, not infinity (a
 * sender's error-feedback residual keeps the rest). Infinity stays infinity
 * and NaN a quiet NaN, so that a shard still refuses them as not finite.
 * Written on the bits with selects rather than branches, so the loops that
 * call them vectorize.
 */
static inline uint32_t dbn_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float dbn_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t dbn_to_bf16(float f) {
    uint32_t u = dbn_bits(f), mag = u & 0x7fffffffu, sign = (u >> 16) & 0x8000u;
    /* Adding 0x7fff plus the kept part's lowest bit rounds ties to even. */
    uint32_t r = (mag + 0x7fffu + ((mag >> 16) & 1u)) >> 16;
    r = r > 0x7f7fu ? 0x7f7fu : r;                 /* saturate a finite value */
    r = mag == 0x7f800000u ? 0x7f80u : r;          /* inf stays inf */
    r = mag > 0x7f800000u ? ((mag >> 16) | 0x40u) : r;  /* NaN: quiet */
    return (uint16_t)(r | sign);
}

static inline float dbn_from_bf16(uint16_t h) { return dbn_float((uint32_t)h << 16); }

static inline uint16_t dbn_to_f16(float f) {
    uint32_t u = dbn_bits(f), mag = u & 0x7fffffffu, sign = (u >> 16) & 0x8000u;
    /* Normal results: rebias the exponent from 127 to 15 and round the 13
       dropped mantissa bits to nearest, ties to even. */
    uint32_t normal = (mag - ((uint32_t)(127 - 15) << 23) + 0xfffu + ((mag >> 13) & 1u)) >> 13;
    /* Subnormal results (|f| < 2^-14): adding 0.5 aligns the value's bits so
       that the FPU itself rounds them to the subnormal's 10 bits. */
    uint32_t sub = dbn_bits(dbn_float(mag) + 0.5f) - dbn_bits(0.5f);
    uint32_t r = mag < 0x38800000u ? sub : normal;
    r = mag >= 0x477ff000u ? 0x7bffu : r;          /* >= 65520 would round to inf */
    r = mag == 0x7f800000u ? 0x7c00u : r;          /* inf stays inf */
    r = mag > 0x7f800000u ? (0x7e00u | ((mag >> 13) & 0x3ffu)) : r;  /* NaN: quiet */
    return (uint16_t)(r | sign);
}

static inline float dbn_from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7fffu;
    /* Normal and subnormal alike: the bits as a binary32 subnormal-scaled
       value, times 2^112, rescale the exponent exactly. */
    float v = dbn_float(em << 13) * 5.192296858534828e+33f;  /* 2^112 */
    uint32_t r = dbn_bits(v);
    r = em >= 0x7c00u ? (0x7f800000u | (em & 0x3ffu) << 13) : r;  /* inf, NaN */
    return dbn_float(r | sign);
}

#endif
