/* The CPU path's per-element passes of k-bit quantization, one pass each.
 *
 * kernels/quantize_cpu.py runs them through ctypes (kernels/cpu_native.py
 * compiles this file at first use); everything per group (min, max, the stored
 * pair, which groups get codes) stays in torch. The arithmetic is the
 * reference's (kernels/quantize.py), one IEEE fp32 rounding per operation:
 * compile without -ffast-math and with -ffp-contract=off, so that no multiply
 * and add fuse. Tests hold the bytes to the reference.
 */
#include <math.h>
#include <stdint.h>

/* sign(x) * sqrt(|x|), correctly rounded, -0 giving +0 (quantize.compand). */
void compand(const float *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float root = copysignf(sqrtf(fabsf(x[i])), x[i]);
        out[i] = root + 0.0f;
    }
}

/* Slots handled per inner pass: codes go through a buffer this long, so that
 * computing them and packing them are two simple loops the compiler vectorizes. */
#define CHUNK 1024

/* Codes of n values (n <= CHUNK) into buffer: floor((v - low) / step + offset)
 * clamped to [0, levels], at least 1 for v > 0 when lift is set (the
 * sign-preserving rule). v - low is never negative in a group that gets codes
 * (low is the group's min rounded down), so floor is truncation, and clamping
 * before it gives the same code. */
static void encode_run(const float *v, const float *noise, int64_t n, float low, float step, float levels,
                       int lift, uint8_t *buffer) {
    if (noise) {
        for (int64_t i = 0; i < n; i++) {
            float scaled = (v[i] - low) / step + noise[i];
            scaled = scaled > levels ? levels : scaled;
            buffer[i] = (uint8_t)(int32_t)scaled;
        }
    } else if (lift) {
        for (int64_t i = 0; i < n; i++) {
            float scaled = (v[i] - low) / step + 0.5f;
            scaled = (v[i] > 0.0f && scaled < 1.0f) ? 1.0f : scaled;
            scaled = scaled > levels ? levels : scaled;
            buffer[i] = (uint8_t)(int32_t)scaled;
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            float scaled = (v[i] - low) / step + 0.5f;
            scaled = scaled > levels ? levels : scaled;
            buffer[i] = (uint8_t)(int32_t)scaled;
        }
    }
}

/* n codes (a multiple of 8 / bits, or the tensor's last ones, zero-padded) packed
 * little-endian within each byte. */
static void pack_run(const uint8_t *buffer, int64_t n, int32_t bits, uint8_t *out) {
    if (bits == 8) {
        for (int64_t i = 0; i < n; i++) out[i] = buffer[i];
    } else if (bits == 4) {
        for (int64_t j = 0; j < n / 2; j++) out[j] = (uint8_t)(buffer[2 * j] | (buffer[2 * j + 1] << 4));
    } else {
        for (int64_t j = 0; j < n / 4; j++)
            out[j] = (uint8_t)(buffer[4 * j] | (buffer[4 * j + 1] << 2) | (buffer[4 * j + 2] << 4) |
                               (buffer[4 * j + 3] << 6));
    }
    const int per_byte = 8 / bits;
    const int64_t whole = n / per_byte;
    if (whole * per_byte < n) {  /* the tensor's last byte: unused slots are 0 */
        uint8_t byte = 0;
        for (int64_t i = whole * per_byte; i < n; i++) byte |= (uint8_t)(buffer[i] << ((i % per_byte) * bits));
        out[whole] = byte;
    }
}

/* Codes of groups [first, last) of x (n fp32 values in groups of group_size, a
 * multiple of 8), packed into out (the whole tensor's codes; group g starts at
 * byte g * group_size * bits / 8). flags[g]: bit 0 the group gets codes (else
 * all 0), bit 1 the sign-preserving lift. noise: one offset per element
 * (stochastic rounding), or NULL for 0.5. */
void encode_groups(const float *x, int64_t n, int64_t group_size, int32_t bits, const float *lows,
                   const float *steps, const uint8_t *flags, const float *noise, uint8_t *out,
                   int64_t first, int64_t last) {
    const int per_byte = 8 / bits;
    const float levels = (float)((1 << bits) - 1);
    uint8_t buffer[CHUNK];
    for (int64_t g = first; g < last; g++) {
        const int64_t end = (g + 1) * group_size < n ? (g + 1) * group_size : n;
        for (int64_t start = g * group_size; start < end; start += CHUNK) {
            const int64_t count = end - start < CHUNK ? end - start : CHUNK;
            if (flags[g] & 1) {
                encode_run(x + start, noise ? noise + start : 0, count, lows[g], steps[g], levels,
                           (flags[g] & 2) != 0, buffer);
            } else {
                for (int64_t i = 0; i < count; i++) buffer[i] = 0;
            }
            pack_run(buffer, count, bits, out + start / per_byte);
        }
    }
}

/* Values of groups [first, last): low + code * step in fp32 (then squared back,
 * y * |y|, when companded), n values in all, codes packed as encode_groups packs them. */
void decode_groups(const uint8_t *codes, int64_t n, int64_t group_size, int32_t bits, const float *lows,
                   const float *steps, int32_t companded, float *out, int64_t first, int64_t last) {
    const int per_byte = 8 / bits;
    uint8_t buffer[CHUNK];
    for (int64_t g = first; g < last; g++) {
        const int64_t end = (g + 1) * group_size < n ? (g + 1) * group_size : n;
        const float low = lows[g], step = steps[g];
        for (int64_t start = g * group_size; start < end; start += CHUNK) {
            const int64_t count = end - start < CHUNK ? end - start : CHUNK;
            const uint8_t *source = codes + start / per_byte;
            const int64_t bytes = (count + per_byte - 1) / per_byte;
            if (bits == 8) {
                for (int64_t i = 0; i < count; i++) buffer[i] = source[i];
            } else if (bits == 4) {
                for (int64_t j = 0; j < bytes; j++) {
                    buffer[2 * j] = source[j] & 15;
                    buffer[2 * j + 1] = source[j] >> 4;
                }
            } else {
                for (int64_t j = 0; j < bytes; j++) {
                    buffer[4 * j] = source[j] & 3;
                    buffer[4 * j + 1] = (source[j] >> 2) & 3;
                    buffer[4 * j + 2] = (source[j] >> 4) & 3;
                    buffer[4 * j + 3] = source[j] >> 6;
                }
            }
            float *dest = out + start;
            for (int64_t i = 0; i < count; i++) {
                float value = (float)buffer[i] * step;
                dest[i] = value + low;
            }
            if (companded) {
                for (int64_t i = 0; i < count; i++) dest[i] = dest[i] * fabsf(dest[i]);
            }
        }
    }
}
