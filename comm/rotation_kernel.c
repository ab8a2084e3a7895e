/* The rotated quantizer's CPU codec in one pass per bucket (comm/rotation.py, comm/native.py).
 *
 * Each bucket of w floats stays in a scratch buffer (L1) through the sign flips, the log2(w)
 * butterfly stages of the Walsh–Hadamard transform, the coding and the bit packing, where the
 * torch path makes a pass over memory for each. Plain C99 without -ffast-math: the order of
 * every floating-point operation is written out, so decoding reproduces the torch path's bits
 * (integer levels through the butterfly are exact; the products and sums after it are the same
 * float32 operations in the same order). Encoding may differ from it in the last bit of a scale
 * (the norms are summed in another order); the payload it writes is what every rank decodes.
 * Loops run over LANES independent accumulators so that the compiler vectorizes them without
 * reassociating a sum; on x86-64 GCC also builds an AVX2 copy of each entry point and picks it
 * at load time where the CPU has AVX2.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

#define LANES 8 /* the smallest bucket width */
#define MAX_LEVELS 16

/* Unnormalized in-place Walsh–Hadamard transform of v[0..w): H·v, H·H = w·I, by stages
 * h = 1, 2, 4, ... pairing elements h apart; each output is one addition or subtraction of the
 * previous stage's, as in comm/rotation.py's `butterfly`, so float inputs give its bits. The
 * first three stages run within groups of 8, written out; the others pair runs of ≥ 8 floats. */
static inline void butterfly(float *restrict v, int64_t w) {
    for (int64_t g = 0; g < w; g += 8) {
        float *p = v + g;
        float a0 = p[0] + p[1], a1 = p[0] - p[1], a2 = p[2] + p[3], a3 = p[2] - p[3];
        float a4 = p[4] + p[5], a5 = p[4] - p[5], a6 = p[6] + p[7], a7 = p[6] - p[7];
        float b0 = a0 + a2, b1 = a1 + a3, b2 = a0 - a2, b3 = a1 - a3;
        float b4 = a4 + a6, b5 = a5 + a7, b6 = a4 - a6, b7 = a5 - a7;
        p[0] = b0 + b4, p[1] = b1 + b5, p[2] = b2 + b6, p[3] = b3 + b7;
        p[4] = b0 - b4, p[5] = b1 - b5, p[6] = b2 - b6, p[7] = b3 - b7;
    }
    for (int64_t half = 8; half < w; half <<= 1) {
        for (int64_t start = 0; start < w; start += half << 1) {
            float *restrict a = v + start, *restrict b = v + start + half;
            for (int64_t i = 0; i < half; i++) {
                float x = a[i], y = b[i];
                a[i] = x + y;
                b[i] = x - y;
            }
        }
    }
}

/* Σ v_i·u_i over v[0..w) in LANES partial sums, added in double at the end. */
static inline float dot(const float *restrict v, const float *restrict u, int64_t w) {
    float lane[LANES] = {0};
    for (int64_t i = 0; i < w; i += LANES)
        for (int k = 0; k < LANES; k++) lane[k] += v[i + k] * u[i + k];
    double total = 0.0;
    for (int k = 0; k < LANES; k++) total += lane[k];
    return (float)total;
}

/* Codes of one bucket into its packed row: byte j holds codes j + t·plane at bits t·bits. */
static inline void pack_row(const uint8_t *restrict code, int64_t w, int bits,
                            uint8_t *restrict row) {
    int64_t per_byte = 8 / bits, plane = w / per_byte;
    for (int64_t j = 0; j < plane; j++) row[j] = code[j];
    for (int64_t t = 1; t < per_byte; t++) {
        const uint8_t *part = code + t * plane;
        for (int64_t j = 0; j < plane; j++) row[j] |= (uint8_t)(part[j] << (t * bits));
    }
}

/* dst[j] = levels[(row[j] >> shift) & mask]: at 1 and 2 bits by compare and select, which
 * vectorizes, at 4 bits by lookup. */
static inline void levels_of(const uint8_t *restrict row, int shift, unsigned mask,
                             int64_t plane, const float *restrict levels, float *restrict dst) {
    if (mask > 3) {
        for (int64_t j = 0; j < plane; j++) dst[j] = levels[(row[j] >> shift) & mask];
        return;
    }
    float l0 = levels[0], l1 = levels[1], l2 = mask > 1 ? levels[2] : 0.0f;
    float l3 = mask > 1 ? levels[3] : 0.0f;
    for (int64_t j = 0; j < plane; j++) {
        unsigned c = (row[j] >> shift) & mask;
        float low = (c & 1u) ? l1 : l0, high = (c & 1u) ? l3 : l2;
        dst[j] = (c & 2u) ? high : low;
    }
}

/* code_i = #{midpoints below t_i} and value_i = levels[code_i], t = y·inverse, by one compare
 * and select per midpoint (no table lookups, so it vectorizes). */
static inline void nearest(const float *restrict y, float inverse, int64_t w,
                           const float *restrict levels, const float *restrict midpoints, int nl,
                           uint8_t *restrict code, float *restrict value) {
    for (int64_t i = 0; i < w; i++) {
        code[i] = 0;
        value[i] = levels[0];
    }
    for (int j = 0; j < nl - 1; j++) {
        float m = midpoints[j], level = levels[j + 1];
        for (int64_t i = 0; i < w; i++) {
            int above = y[i] * inverse > m;
            code[i] += (uint8_t)above;
            value[i] = above ? level : value[i];
        }
    }
}

/* The integer levels of one packed row of w codes, into v[0..w). */
static inline void unpack_levels(const uint8_t *restrict row, int64_t w, int bits,
                                 const float *restrict integer_levels, float *restrict v) {
    int64_t per_byte = 8 / bits, plane = w / per_byte;
    for (int64_t t = 0; t < per_byte; t++)
        levels_of(row, (int)(t * bits), (1u << bits) - 1u, plane, integer_levels, v + t * plane);
}

/* Bucket r's float32 scale from a payload's scale bytes (which may sit unaligned). */
static inline float scale_at(const uint8_t *scales, int64_t r) {
    float scale;
    memcpy(&scale, scales + r * sizeof(float), sizeof scale);
    return scale;
}

/* y = H·(x·turn) of n source floats zero-padded to w, turn = D·norm: (H·D·x)·norm up to
 * rounding, one multiply fewer. */
static inline void rotate_into(float *restrict y, const float *restrict src, int64_t n,
                               int64_t w, const float *restrict turn) {
    for (int64_t i = 0; i < n; i++) y[i] = src[i] * turn[i];
    for (int64_t i = n; i < w; i++) y[i] = 0.0f;
    butterfly(y, w);
}

/* One rotated bucket y coded (EDEN, deterministic): its packed codes into `row`; returns its
 * unbiasing scale S = ‖y‖²/⟨y, c⟩ (0 for a zero bucket, NaN for a non-finite one). code and
 * value are scratch of w entries. errors (or NULL): += ‖S·c − y‖² and ‖y‖². */
static inline float code_bucket(const float *restrict y, int64_t w, const float *levels,
                                const float *midpoints, int nl, int bits, uint8_t *restrict code,
                                float *restrict value, uint8_t *restrict row, double *errors) {
    float energy = dot(y, y, w);
    float sigma = sqrtf(energy / (float)w);
    float inverse = sigma > 0.0f ? 1.0f / sigma : 0.0f;
    nearest(y, inverse, w, levels, midpoints, nl, code, value);
    float inner = dot(y, value, w);
    pack_row(code, w, bits, row);
    float s = inner > 0.0f ? energy / inner : 0.0f;
    s = isfinite(energy) ? s : NAN;
    if (errors) {
        double error = 0.0;
        for (int64_t i = 0; i < w; i++) {
            double d = (double)value[i] * s - y[i];
            error += d * d;
        }
        errors[0] += error;
        errors[1] += energy;
    }
    return s;
}

/* EDEN's deterministic codes of `rows` buckets of y (comm/rotation.py, deterministic_codes,
 * and RotatedQuantizer.requantize_sum, `scatter`'s owner stage). Per bucket y starts as:
 * the source x (`valid` floats; a last partial bucket zero-padded), rotated first to
 * H·D·x·norm when rotate != 0 (signs: D, norm: 1/√w); or 0 when x is NULL. To it are added
 * the rotated values c·(S_p·grid) of `parts` received payloads in payload order (codes[p],
 * scales[p] as bytes; integer levels c). levels: the nl levels, midpoints: their nl−1
 * midpoints. Out: codes [rows, w·bits/8] (bits 1, 2, 4), scales [rows] (NaN for a non-finite
 * bucket), and with errors != NULL the sums errors[0] += Σ‖S·c − y‖², errors[1] += Σ‖y‖².
 * Returns 0, or −1 if scratch memory could not be had. */
VECTOR_CLONES
int distq_eden_code(const float *x, int64_t valid, int64_t rows, int64_t w, int rotate,
                    const float *signs, float norm, const uint8_t *const *codes,
                    const uint8_t *const *scales, int parts, const float *integer_levels,
                    float grid, const float *levels, const float *midpoints, int nl, int bits,
                    uint8_t *out_codes, float *out_scales, double *errors) {
    float *y = malloc((size_t)w * 4 * sizeof(float));
    uint8_t *code = malloc((size_t)w);
    if (!y || !code || nl > MAX_LEVELS) {
        free(y);
        free(code);
        return -1;
    }
    float *value = y + w, *turn = y + 2 * w, *v = y + 3 * w;
    if (rotate)
        for (int64_t i = 0; i < w; i++) turn[i] = signs[i] * norm;
    int64_t row_bytes = w * bits / 8;
    for (int64_t r = 0; r < rows; r++) {
        int64_t first = r * w, n = valid - first < w ? valid - first : w;
        if (n < 0 || !x) n = 0;
        if (x && rotate) {
            rotate_into(y, x + first, n, w, turn);
        } else {
            if (n) memcpy(y, x + first, (size_t)n * sizeof(float));
            for (int64_t i = n; i < w; i++) y[i] = 0.0f;
        }
        for (int p = 0; p < parts; p++) {
            unpack_levels(codes[p] + r * row_bytes, w, bits, integer_levels, v);
            float factor = scale_at(scales[p], r) * grid;
            for (int64_t i = 0; i < w; i++) y[i] += v[i] * factor;
        }
        out_scales[r] = code_bucket(y, w, levels, midpoints, nl, bits, code, value,
                                    out_codes + r * row_bytes, errors);
    }
    free(y);
    free(code);
    return 0;
}

/* out ← [out +] D·Σ_p H·c_p·(S_p·unit) over `parts` payloads of `rows` buckets each (codes[p],
 * scales[p]; integer levels c), written to the first `valid` floats (comm/rotation.py,
 * RotatedQuantizer._decode): one payload transformed on its integer levels, several summed
 * in payload order in the rotated domain and transformed once; the torch path's float32
 * operations either way. Scales are the payloads' bytes (float32, possibly unaligned).
 * Returns 0, or −1 without memory. */
VECTOR_CLONES
int distq_eden_decode(const uint8_t *const *codes, const uint8_t *const *scales, int parts,
                      int64_t rows, int64_t w, int bits, const float *integer_levels,
                      float unit, const float *signs, float *out, int64_t valid, int accumulate) {
    float *total = malloc((size_t)w * 2 * sizeof(float));
    if (!total) return -1;
    float *v = total + w;
    int64_t row_bytes = w * bits / 8;
    for (int64_t r = 0; r < rows; r++) {
        for (int p = 0; p < parts; p++) {
            unpack_levels(codes[p] + r * row_bytes, w, bits, integer_levels, v);
            if (parts == 1) butterfly(v, w); /* exact: integer levels */
            float factor = scale_at(scales[p], r) * unit;
            if (p == 0)
                for (int64_t i = 0; i < w; i++) total[i] = v[i] * factor;
            else
                for (int64_t i = 0; i < w; i++) total[i] += v[i] * factor;
        }
        if (parts > 1) butterfly(total, w); /* once, on the sum in the rotated domain */
        int64_t first = r * w, n = valid - first < w ? valid - first : w;
        float *o = out + first;
        if (accumulate)
            for (int64_t i = 0; i < n; i++) o[i] += total[i] * signs[i];
        else
            for (int64_t i = 0; i < n; i++) o[i] = total[i] * signs[i];
    }
    free(total);
    return 0;
}
