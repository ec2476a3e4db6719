/* The all-reduce's chunk kernels in C: the int8 blockwise codec of shoal.kernels.codecs (one
 * pass per block where torch needs five) and the owners' reductions. Loaded by
 * shoal/kernels/native.py, which compiles it on first use with
 * -O3 -ffp-contract=off: every operation is one IEEE fp32 operation rounded on its own
 * (no fused multiply-add, no reassociation), so the bytes equal the torch code's
 * (tests/test_native_kernels.py compares them).
 *
 * Layout of an encoded chunk of n elements: ceil(n / block) fp32 scales, then n int8 codes.
 * scale = absmax / 127 of the block; code = round-half-even(x / max(scale, FLT_MIN)).
 * A NaN in a block makes its scale NaN (an infinity makes it infinite): the caller refuses
 * the contribution by its scales. */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline int64_t block_end(int64_t lo, int64_t block, int64_t n) {
    return lo + block < n ? lo + block : n;
}

/* Encode one block of values (len <= block) into its scale and codes. The absmax is taken
 * on the bit patterns with the sign cleared (for floats that are not NaN, the order of
 * those integers is the order of the magnitudes; a NaN's is above infinity's), an integer
 * max that the compiler vectorizes, where a float max with NaN semantics it does not. */
static inline void encode_block(const float *restrict x, int64_t len, float *restrict scale,
                                int8_t *restrict codes) {
    uint32_t top = 0;
    for (int64_t i = 0; i < len; i++) {
        uint32_t u;
        memcpy(&u, &x[i], sizeof u);
        u &= 0x7fffffffu;
        top = u > top ? u : top;
    }
    if (top >= 0x7f800000u) { /* NaN or infinity: the contribution is refused by its scale */
        *scale = top == 0x7f800000u ? INFINITY : NAN;
        memset(codes, 0, (size_t)len);
        return;
    }
    float m;
    memcpy(&m, &top, sizeof m);
    float s = m / 127.0f;
    *scale = s;
    float d = s > FLT_MIN ? s : FLT_MIN;
    for (int64_t i = 0; i < len; i++) codes[i] = (int8_t)rintf(x[i] / d);
}

void shoal_int8_encode(const float *restrict x, int64_t n, int64_t block,
                       float *restrict scales, int8_t *restrict codes) {
    for (int64_t lo = 0, b = 0; lo < n; lo += block, b++)
        encode_block(x + lo, block_end(lo, block, n) - lo, scales + b, codes + lo);
}

void shoal_int8_decode(const float *restrict scales, const int8_t *restrict codes, int64_t n,
                       int64_t block, float *restrict out) {
    for (int64_t lo = 0, b = 0; lo < n; lo += block, b++) {
        int64_t hi = block_end(lo, block, n);
        float s = scales[b];
        for (int64_t i = lo; i < hi; i++) out[i] = (float)codes[i] * s;
    }
}

/* The owner's reduction of k int8 contributions, encoded: per element
 * acc = 0; acc += x_j (x_j * w_j where w_j != 1), in the order given; acc / total.
 * acc: scratch of block floats. */
void shoal_int8_reduce(int64_t k, const float *const *scales, const int8_t *const *codes,
                       const float *weights, float total, int64_t n, int64_t block,
                       float *restrict acc, float *restrict out_scales,
                       int8_t *restrict out_codes) {
    for (int64_t lo = 0, b = 0; lo < n; lo += block, b++) {
        int64_t len = block_end(lo, block, n) - lo;
        for (int64_t i = 0; i < len; i++) acc[i] = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            float s = scales[j][b], w = weights[j];
            const int8_t *c = codes[j] + lo;
            if (w == 1.0f) {
                for (int64_t i = 0; i < len; i++) acc[i] = acc[i] + (float)c[i] * s;
            } else {
                for (int64_t i = 0; i < len; i++) acc[i] = acc[i] + ((float)c[i] * s) * w;
            }
        }
        for (int64_t i = 0; i < len; i++) acc[i] = acc[i] / total;
        encode_block(acc, len, out_scales + b, out_codes + lo);
    }
}

/* The owner's reduction of k fp32 contributions: out = (0 + x_0 (* w_0) + x_1 ...) / total
 * per element, in the order given, and bad[j] = 1 where x_j holds a NaN or an infinity (an
 * exponent of all ones): the finiteness check rides on the pass that reads them anyway.
 * In tiles, so each x_j streams once and out stays in the cache between them. */
void shoal_f32_reduce(int64_t k, const float *const *xs, const float *weights, float total,
                      int64_t n, float *restrict out, uint8_t *restrict bad) {
    enum { TILE = 4096 };
    for (int64_t j = 0; j < k; j++) bad[j] = 0;
    for (int64_t lo = 0; lo < n; lo += TILE) {
        int64_t len = n - lo < TILE ? n - lo : TILE;
        float *restrict acc = out + lo;
        for (int64_t i = 0; i < len; i++) acc[i] = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            const float *restrict x = xs[j] + lo;
            float w = weights[j];
            uint32_t nonfinite = 0;
            for (int64_t i = 0; i < len; i++) {
                uint32_t u;
                memcpy(&u, &x[i], sizeof u);
                nonfinite |= (u & 0x7f800000u) == 0x7f800000u;
            }
            if (w == 1.0f) {
                for (int64_t i = 0; i < len; i++) acc[i] = acc[i] + x[i];
            } else {
                for (int64_t i = 0; i < len; i++) acc[i] = acc[i] + x[i] * w;
            }
            bad[j] |= (uint8_t)nonfinite;
        }
        for (int64_t i = 0; i < len; i++) acc[i] = acc[i] / total;
    }
}
