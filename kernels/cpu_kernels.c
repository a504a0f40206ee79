/* The CPU path's passes of k-bit quantization: encoding and decoding, one pass each.
 *
 * kernels/quantize_cpu.py runs them through ctypes (kernels/cpu_native.py
 * compiles this file at first use); only the min and max of groups that are not
 * companded stay in torch (amin/amax, whose choice between -0 and +0 is torch's).
 * The arithmetic is the reference's (kernels/quantize.py), one IEEE fp32
 * rounding per operation: compile without -ffast-math and with
 * -ffp-contract=off, so that no multiply and add fuse. Tests hold the bytes to
 * the reference.
 *
 * Each group's stored (min, step) pair is computed here too (group_pairs,
 * decode_pairs): in torch ops that took some thirty small calls per tensor,
 * a quarter of a millisecond of Python whatever the tensor's size.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* sign(x) * sqrt(|x|), correctly rounded, -0 giving +0 (quantize.compand). Companded
 * values are made chunk by chunk where they are used, never as a whole tensor. */
static void compand(const float *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float root = copysignf(sqrtf(fabsf(x[i])), x[i]);
        out[i] = root + 0.0f;
    }
}

/* Slots handled per inner pass: values go through buffers this long, so that each
 * step (compand, encode, pack) is a simple loop the compiler vectorizes. */
#define CHUNK 1024

/* Per group of x (n values, group_size each, the last one short), the min and max of
 * its companded values, NaN for both where one is NaN (as torch's amin and amax give).
 * Companded values have no -0, so which zero is the min cannot differ from torch's. */
void companded_bounds(const float *x, int64_t n, int64_t group_size, float *lows, float *highs) {
    float buffer[CHUNK];
    const int64_t groups = (n + group_size - 1) / group_size;
    for (int64_t g = 0; g < groups; g++) {
        const int64_t end = (g + 1) * group_size < n ? (g + 1) * group_size : n;
        float low = INFINITY, high = -INFINITY;
        int nan = 0;
        for (int64_t start = g * group_size; start < end; start += CHUNK) {
            const int64_t count = end - start < CHUNK ? end - start : CHUNK;
            compand(x + start, buffer, count);
            for (int64_t i = 0; i < count; i++) {
                low = buffer[i] < low ? buffer[i] : low;
                high = buffer[i] > high ? buffer[i] : high;
                nan |= buffer[i] != buffer[i];
            }
        }
        lows[g] = nan ? NAN : low;
        highs[g] = nan ? NAN : high;
    }
}

/* 16-bit floats: IEEE half through the compiler's _Float16 (round to nearest even),
 * bfloat16 as torch rounds it (to nearest even; NaN never reaches a stored pair). */
static float half_value(uint16_t raw) {
    _Float16 half;
    memcpy(&half, &raw, 2);
    return (float)half;
}

static uint16_t half_bits(float value) {
    _Float16 half = (_Float16)value;
    uint16_t raw;
    memcpy(&raw, &half, 2);
    return raw;
}

static float bf16_value(uint16_t raw) {
    uint32_t bits = (uint32_t)raw << 16;
    float value;
    memcpy(&value, &bits, 4);
    return value;
}

static uint16_t bf16_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    if (value != value) return 0x7FC0;
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

static float value_of(uint16_t raw, int bf16) { return bf16 ? bf16_value(raw) : half_value(raw); }
static uint16_t bits_of(float value, int bf16) { return bf16 ? bf16_bits(value) : half_bits(value); }

/* One ulp from stored (raw bits) toward +inf (direction 1) or -inf (-1): +-0 moves to the
 * smallest subnormal; adding 1 to sign-magnitude bits moves away from zero (quantize.step_toward). */
static uint16_t one_ulp(uint16_t raw, float stored, int direction) {
    if (stored == 0.0f) return direction > 0 ? 0x0001 : 0x8001;
    return (uint16_t)(((stored > 0.0f) == (direction > 0)) ? raw + 1 : raw - 1);
}

/* A group's min rounded down to the 16-bit format and the step from it rounded up (quantize._min_and_step). */
static void min_and_step(float low, float high, float levels, int bf16, uint16_t *min_raw, uint16_t *step_raw) {
    uint16_t lowest = bits_of(low, bf16);
    if (value_of(lowest, bf16) > low) lowest = one_ulp(lowest, value_of(lowest, bf16), -1);
    const float step = (high - value_of(lowest, bf16)) / levels;
    uint16_t rounded = bits_of(step, bf16);
    if (value_of(rounded, bf16) < step) rounded = one_ulp(rounded, value_of(rounded, bf16), 1);
    *min_raw = lowest;
    *step_raw = rounded;
}

/* quantize.group_pairs for groups with fp32 min low[g] and max high[g]: the stored pair (raw
 * 16-bit mins and steps; an fp16 group too wide for fp16 keeps a bf16 pair with the step's sign
 * bit set; a NaN pair where no pair holds), the fp32 (min, step) encoding uses, and flags:
 * bit 0 the group gets codes, bit 1 the sign-preserving lift (its min is 0 and lift is set). */
void group_pairs(const float *low, const float *high, int64_t groups, int32_t levels, int32_t bf16,
                 int32_t lift, uint16_t *mins, uint16_t *steps, float *min_values, float *step_values,
                 uint8_t *flags) {
    const uint16_t nan_bits = bf16 ? 0x7FC0 : 0x7E00;
    for (int64_t g = 0; g < groups; g++) {
        const int finite = isfinite(low[g]) && isfinite(high[g]);
        uint16_t min_raw, step_raw;
        min_and_step(low[g], high[g], (float)levels, bf16, &min_raw, &step_raw);
        float min_value = value_of(min_raw, bf16), step_value = value_of(step_raw, bf16);
        int good = finite && isfinite(min_value) && isfinite(step_value);
        if (!bf16 && finite && !good) {
            uint16_t wide_min, wide_step;
            min_and_step(low[g], high[g], (float)levels, 1, &wide_min, &wide_step);
            if (isfinite(bf16_value(wide_min)) && isfinite(bf16_value(wide_step))) {
                min_value = bf16_value(wide_min);
                step_value = bf16_value(wide_step);
                min_raw = wide_min;
                step_raw = (uint16_t)(wide_step | 0x8000);
                good = 1;
            }
        }
        mins[g] = good ? min_raw : nan_bits;
        steps[g] = good ? step_raw : nan_bits;
        min_values[g] = min_value;
        step_values[g] = step_value;
        const int usable = good && step_value != 0.0f;
        flags[g] = (uint8_t)(usable | ((usable && lift && min_value == 0.0f) << 1));
    }
}

/* quantize.decoded_min_and_step: the fp32 (min, step) of each stored pair, an fp16 pair whose
 * step has its sign bit set read as bf16. */
void decode_pairs(const uint16_t *mins, const uint16_t *steps, int64_t groups, int32_t bf16, float *min_values,
                  float *step_values) {
    for (int64_t g = 0; g < groups; g++) {
        const int wide = bf16 || (steps[g] & 0x8000);
        min_values[g] = value_of(mins[g], wide);
        step_values[g] = value_of(bf16 ? steps[g] : (uint16_t)(steps[g] & (wide ? 0x7FFF : 0xFFFF)), wide);
    }
}

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
 * multiple of 8; companded first where companded is set), packed into out
 * (the whole tensor's codes; group g starts at byte g * group_size * bits / 8). flags[g]: bit 0 the group gets codes (else
 * all 0), bit 1 the sign-preserving lift. noise: one offset per element
 * (stochastic rounding), or NULL for 0.5. */
void encode_groups(const float *x, int64_t n, int64_t group_size, int32_t bits, int32_t companded,
                   const float *lows, const float *steps, const uint8_t *flags, const float *noise, uint8_t *out,
                   int64_t first, int64_t last) {
    const int per_byte = 8 / bits;
    const float levels = (float)((1 << bits) - 1);
    uint8_t buffer[CHUNK];
    float roots[CHUNK];
    for (int64_t g = first; g < last; g++) {
        const int64_t end = (g + 1) * group_size < n ? (g + 1) * group_size : n;
        for (int64_t start = g * group_size; start < end; start += CHUNK) {
            const int64_t count = end - start < CHUNK ? end - start : CHUNK;
            if (flags[g] & 1) {
                const float *values = x + start;
                if (companded) {
                    compand(values, roots, count);
                    values = roots;
                }
                encode_run(values, noise ? noise + start : 0, count, lows[g], steps[g], levels,
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
