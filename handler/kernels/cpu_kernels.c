/*
 * Fused CPU kernels for the bfloat16 serving path (handler/kernels/cpu.py binds them).
 *
 * Why: in a decode step plain torch runs many small ops per layer (gathering paged KV into
 * padded tensors, transposes, masks, norms in several passes), each a pass over memory and a
 * dispatch. Each kernel here replaces a chain of those ops with one pass over the data, reading
 * the paged cache in place.
 *
 * Conventions: bf16 tensors are uint16_t, contiguous rows with the strides given; all math in
 * float32, rounded to bf16 (nearest-even) once per stored value, except where a comment says it
 * follows Hugging Face's rounding points. OpenMP shares torch's runtime (same libgomp soname),
 * so these loops run on torch's thread pool with its thread count.
 */
#include <math.h>
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define THAW_AVX512_BF16 1
#endif
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}

static inline bf16 f32_to_bf16(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (bf16)((v.u >> 16) | 0x40u); /* quiet NaN */
    return (bf16)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* Widen a bf16 row to float32: a shift, which vectorises. */
static inline void widen(const bf16 *src, float *dst, int64_t n) {
    uint32_t *bits = (uint32_t *)dst;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) bits[i] = (uint32_t)src[i] << 16;
}

/*
 * exp for softmax weights and SiLU, written out so loops over it vectorise (glibc's expf is a
 * scalar call here). Cody-Waite reduction and Cephes' degree-6 polynomial: within 2 ulp of expf on
 * [-87, 88]; below that it returns exp(-87), a weight of 1e-38 next to the row's maximum of 1.
 */
static inline float approx_expf(float x) {
    float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(clamped * 1.44269504088896341f + 0.5f);
    float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return x != x ? x : p * scale.f; /* NaN stays NaN */
}

/*
 * Loops over fewer values than this run on one thread: a parallel region's wake-up and barrier
 * cost more than the work (and, when another process holds the second core, far more). torch
 * uses the same grain size for its element-wise ops.
 */
#define THAW_PARALLEL_MIN 32768

int thaw_kernels_abi(void) { return 4; }

/* Bit 0: compiled with the AVX-512 BF16 attention path. */
int thaw_kernels_features(void) {
#ifdef THAW_AVX512_BF16
    return 1;
#else
    return 0;
#endif
}

/*
 * RMS norm with an optional residual add first, over rows of `dim`; the residual stream
 * (hidden) is float32, delta and output bf16, the norm weights float32 (Gemma's 1 + weight is
 * not a bf16 value):
 *   if delta: hidden += delta in float32 (the stream is never rounded); with delta_weight the
 *     delta is RMS-normed by it first (Gemma's norms of the attention and MLP outputs), unrounded
 *   out = bf16(hidden * rsqrt(mean(hidden^2) + eps) * weight), one rounding
 * transformers keeps the stream in bf16, rounding it after each of a model's 2 x layers adds:
 * the largest drift from float32 results (tests/handler/kernels/test_engine_cpu_kernels.py
 * measures it).
 */
void thaw_add_rms_norm(float *hidden, const bf16 *delta, const float *delta_weight,
                       const float *weight, bf16 *out, int64_t rows, int64_t dim, float eps) {
#pragma omp parallel for schedule(static) if (rows * dim >= THAW_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        float *h = hidden + r * dim;
        if (delta != NULL) {
            const bf16 *d = delta + r * dim;
            float dnorm = 1.0f;
            if (delta_weight != NULL) {
                float dsum = 0.0f;
#pragma omp simd reduction(+ : dsum)
                for (int64_t i = 0; i < dim; i++) dsum += bf16_to_f32(d[i]) * bf16_to_f32(d[i]);
                dnorm = 1.0f / sqrtf(dsum / (float)dim + eps);
#pragma omp simd
                for (int64_t i = 0; i < dim; i++) h[i] += bf16_to_f32(d[i]) * dnorm * delta_weight[i];
            } else {
#pragma omp simd
                for (int64_t i = 0; i < dim; i++) h[i] += bf16_to_f32(d[i]);
            }
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < dim; i++) sum += h[i] * h[i];
        float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        bf16 *o = out + r * dim;
        for (int64_t i = 0; i < dim; i++) o[i] = f32_to_bf16(h[i] * inv * weight[i]);
    }
}

/*
 * Rotary embedding in place, "rotate half" layout, on `heads` heads of each row of x:
 *   x[i] = x[i] * cos - x[i + half] * sin,  x[i + half] = x[i + half] * cos + x[i] * sin
 * cos/sin: float32 [max_positions, half] per frequency. With norm weights (float32, head_dim
 * each: Qwen3's and Gemma 3's q/k norms) every head is RMS-normed first, the first q_heads by
 * q_norm and the rest by k_norm, in float32: one rounding for norm and rotation together.
 */
void thaw_rotary(bf16 *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t head_dim,
                 const int64_t *positions, const float *cos_table, const float *sin_table,
                 const float *q_norm, const float *k_norm, int64_t q_heads, float eps) {
    int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (rows * heads * head_dim >= THAW_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_table + positions[r] * half;
        const float *s = sin_table + positions[r] * half;
        for (int64_t h = 0; h < heads; h++) {
            bf16 *v = x + r * row_stride + h * head_dim;
            const float *w = h < q_heads ? q_norm : k_norm;
            float inv = 1.0f;
            if (w != NULL) {
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int64_t i = 0; i < head_dim; i++) sum += bf16_to_f32(v[i]) * bf16_to_f32(v[i]);
                inv = 1.0f / sqrtf(sum / (float)head_dim + eps);
            }
            for (int64_t i = 0; i < half; i++) {
                float a = bf16_to_f32(v[i]), b = bf16_to_f32(v[i + half]);
                if (w != NULL) {
                    a *= inv * w[i];
                    b *= inv * w[i + half];
                }
                v[i] = f32_to_bf16(a * c[i] - b * s[i]);
                v[i + half] = f32_to_bf16(b * c[i] + a * s[i]);
            }
        }
    }
}

/*
 * Write each token's keys and values into its cache slot; slot -1 (padding) writes nothing.
 * k/v rows: kv_width = kv_heads * head_dim values, `stride` apart. Cache: [slots, kv_width].
 */
void thaw_store_kv(const bf16 *k, const bf16 *v, int64_t stride, int64_t rows, int64_t kv_width,
                   const int64_t *slots, bf16 *k_cache, bf16 *v_cache) {
    for (int64_t r = 0; r < rows; r++) {
        int64_t slot = slots[r];
        if (slot < 0) continue;
        memcpy(k_cache + slot * kv_width, k + r * stride, (size_t)kv_width * sizeof(bf16));
        memcpy(v_cache + slot * kv_width, v + r * stride, (size_t)kv_width * sizeof(bf16));
    }
}

#ifdef THAW_AVX512_BF16
/* exp on 16 lanes: approx_expf's reduction and polynomial; vscalefps applies 2^n. */
static inline __m512 exp16(__m512 x) {
    __m512 clamped = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), clamped);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512 result = _mm512_scalef_ps(p, n);
    /* NaN stays NaN */
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_mask_blend_ps(nan, result, x);
}

/*
 * The cache rows of a step are cold (the step streamed all the weights since they were last
 * read). Values are read a KV head's slice per row, too sparse for the hardware prefetcher:
 * they are fetched whole while the keys of the same rows are read.
 */
static inline void prefetch_rows(const bf16 *cache, const int32_t *table, int64_t first,
                                 int64_t end, int64_t block_size, int64_t kv_width, int64_t bytes,
                                 int hint_l1) {
    for (int64_t j = first; j < end; j++) {
        const char *row = (const char *)(cache + ((int64_t)table[j / block_size] * block_size + j % block_size) * kv_width);
        for (int64_t byte = 0; byte < bytes; byte += 64) {
            if (hint_l1)
                _mm_prefetch(row + byte, _MM_HINT_T0);
            else
                _mm_prefetch(row + byte, _MM_HINT_T1);
        }
    }
}

static inline __m512 widen16(const bf16 *src) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/*
 * Lane i of the result = the sum of v[i]'s 16 lanes: four levels of shuffle-and-add (15 adds)
 * instead of 16 horizontal reductions of 4 dependent shuffles each. A final permute puts the
 * sums back in order (tests/handler/kernels/test_cpu_kernels.py checks it through the
 * attention output).
 */
static inline __attribute__((always_inline)) __m512 sum16x16(const __m512 v[16]) {
    __m512 a[8], b[4], c[2];
    /* a[i]: its low half is v[i] folded to 8 partial sums, its high half v[i + 8]. */
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44),
                             _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
    /* b[i]: its 128-bit lanes hold 4 partials of v[i], v[i + 8], v[i + 4], v[i + 12]. */
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], 0x88),
                             _mm512_shuffle_f32x4(a[i], a[i + 4], 0xDD));
    /* c[i]: per 128-bit lane, 2 partials of b[i]'s vector, then 2 of b[i + 2]'s. */
    for (int i = 0; i < 2; i++) {
        __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[i]), _mm512_castps_pd(b[i + 2]));
        __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[i]), _mm512_castps_pd(b[i + 2]));
        c[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    /* Lane 4L + r now holds the sum of v[o[L] + s[r]], o = {0, 8, 4, 12}, s = {0, 2, 1, 3}. */
    __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88),
                             _mm512_shuffle_ps(c[0], c[1], 0xDD));
    const __m512i order = _mm512_set_epi32(15, 13, 14, 12, 7, 5, 6, 4, 11, 9, 10, 8, 3, 1, 2, 0);
    return _mm512_permutexvar_ps(order, d);
}

/* tanh on 16 lanes from exp16: 1 - 2 / (1 + e^2x) saturates to +-1 without overflow. */
static inline __m512 tanh16(__m512 x) {
    __m512 one = _mm512_set1_ps(1.0f);
    __m512 e = exp16(_mm512_add_ps(x, x));
    return _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(one, e)));
}

/*
 * P.V for `gc` (a constant after inlining) query heads of one KV head: every value row is
 * widened once and multiplied into all of them, the accumulators stay in registers
 * (gc * lanes <= 16), and each head's output is scaled by 1 / its softmax total at the end.
 * Keys at positions first .. first + n - 1; scores[j] belongs to position first + j.
 */
static inline __attribute__((always_inline)) void weighted_values(
    const int gc, bf16 *out, const bf16 *v_cache, const int32_t *table, int64_t first, int64_t n,
    int64_t kv_width, int64_t block_size, const float *scores, int64_t stride, const float *inv,
    const int64_t head_dim) {
    const int64_t lanes = head_dim / 16;
    if (gc * lanes > 16) return; /* never: the caller sizes gc; lets the compiler see bounds */
    __m512 acc[16];
    for (int i = 0; i < gc * lanes; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        int64_t pos = first + j;
        const bf16 *vrow = v_cache + ((int64_t)table[pos / block_size] * block_size + pos % block_size) * kv_width;
        __m512 v[16];
        for (int64_t c = 0; c < lanes; c++) v[c] = widen16(vrow + 16 * c);
        for (int g = 0; g < gc; g++) {
            __m512 p = _mm512_set1_ps(scores[g * stride + j]);
            for (int64_t c = 0; c < lanes; c++)
                acc[g * lanes + c] = _mm512_fmadd_ps(p, v[c], acc[g * lanes + c]);
        }
    }
    for (int g = 0; g < gc; g++) {
        __m512 scale = _mm512_set1_ps(inv[g]);
        for (int64_t c = 0; c < lanes; c++) {
            /* VCVTNEPS2BF16 rounds to nearest even, as f32_to_bf16 does. */
            __m256i rounded = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[g * lanes + c], scale));
            _mm256_storeu_si256((__m256i *)(out + g * head_dim + 16 * c), rounded);
        }
    }
}

/*
 * Decode attention of one sequence for `nkv` consecutive KV heads (all of them, or one), AVX-512,
 * over the keys at positions first .. len - 1 (first > 0: a sliding window):
 * - scores 16 keys at a time: q.k by vdpbf16ps (bf16 pairs multiplied exactly, summed in
 *   float32), the 16 dot products of a head reduced together by sum16x16, then soft-capped
 *   (softcap > 0). Every KV head of the task is done per 16 rows, so cache rows are read whole
 *   and in order (the hardware prefetcher streams them) while the same rows' values are
 *   prefetched into L2 for P.V;
 * - softmax in float32 over those keys, left unnormalised;
 * - P.V in float32 by weighted_values, per KV head, groups of heads that fit the registers.
 * head_dim: a multiple of 32, at most 256, a literal for the common size. scores: scratch of
 * nkv * group * (round_up(len - first, 16) + 1) floats.
 */
static inline __attribute__((always_inline)) void attend_avx512(
    bf16 *out, const bf16 *q, const bf16 *k_cache, const bf16 *v_cache, const int32_t *table,
    int64_t first, int64_t len, int64_t nkv, int64_t group, int64_t kv_width, int64_t block_size,
    float scale, float softcap, float *scores, const int64_t head_dim) {
    const int64_t chunks = head_dim / 32; /* 32 bf16 per vdpbf16ps */
    const int64_t n = len - first;
    const int64_t stride = (n + 15) & ~(int64_t)15;
    const int64_t heads = nkv * group;
    const int64_t row_bytes = (int64_t)sizeof(bf16) * nkv * head_dim;
    const __m512 scale16 = _mm512_set1_ps(scale);
    const __m512 cap16 = _mm512_set1_ps(softcap), inv_cap16 = _mm512_set1_ps(1.0f / softcap);
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const bf16 *rows[16];
        for (int i = 0; i < 16; i++) {
            /* Past the context: repeat the last key; its score is never stored. */
            int64_t j = first + (j0 + i < n ? j0 + i : n - 1);
            rows[i] = k_cache + ((int64_t)table[j / block_size] * block_size + j % block_size) * kv_width;
        }
        int64_t end = first + (j0 + 16 < n ? j0 + 16 : n);
        int64_t next_end = first + (j0 + 32 < n ? j0 + 32 : n);
        prefetch_rows(k_cache, table, end, next_end, block_size, kv_width, row_bytes, 1);
        prefetch_rows(v_cache, table, first + j0, end, block_size, kv_width, row_bytes, 0);
        __mmask16 valid = n - j0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j0)) - 1u);
        for (int64_t h = 0; h < heads; h++) {
            const bf16 *qh = q + h * head_dim;
            const int64_t offset = (h / group) * head_dim;
            __m512 dots[16];
            for (int i = 0; i < 16; i++) dots[i] = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; c++) {
                __m512bh qv = (__m512bh)_mm512_loadu_si512((const void *)(qh + 32 * c));
                for (int i = 0; i < 16; i++)
                    dots[i] = _mm512_dpbf16_ps(
                        dots[i], qv,
                        (__m512bh)_mm512_loadu_si512((const void *)(rows[i] + offset + 32 * c)));
            }
            __m512 s = _mm512_mul_ps(sum16x16(dots), scale16);
            if (softcap > 0.0f) s = _mm512_mul_ps(cap16, tanh16(_mm512_mul_ps(s, inv_cap16)));
            _mm512_mask_storeu_ps(scores + h * stride + j0, valid, s);
        }
    }
    float *inv = scores + heads * stride;
    for (int64_t h = 0; h < heads; h++) {
        float *sh = scores + h * stride;
        __m512 peak = _mm512_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) peak = _mm512_max_ps(peak, _mm512_loadu_ps(sh + j));
        __mmask16 tail = (__mmask16)((1u << (n - j)) - 1u);
        peak = _mm512_mask_max_ps(peak, tail, peak, _mm512_maskz_loadu_ps(tail, sh + j));
        __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(peak));
        __m512 total = _mm512_setzero_ps();
        for (j = 0; j + 16 <= n; j += 16) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sh + j), top));
            _mm512_storeu_ps(sh + j, e);
            total = _mm512_add_ps(total, e);
        }
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sh + j), top));
        _mm512_mask_storeu_ps(sh + j, tail, e);
        total = _mm512_mask_add_ps(total, tail, total, e);
        inv[h] = 1.0f / _mm512_reduce_add_ps(total);
    }
    /* Heads per pass of weighted_values: as many as keep its accumulators in 16 registers. */
    const int64_t per_pass = 16 / (head_dim / 16);
    for (int64_t kv = 0; kv < nkv; kv++) {
        const bf16 *vc = v_cache + kv * head_dim;
        for (int64_t g0 = 0; g0 < group; g0 += per_pass) {
            int64_t gc = group - g0 < per_pass ? group - g0 : per_pass;
            int64_t h = kv * group + g0;
            bf16 *o = out + h * head_dim;
            const float *sh = scores + h * stride;
#define THAW_VALUES(G) \
    weighted_values(G, o, vc, table, first, n, kv_width, block_size, sh, stride, inv + h, head_dim)
            switch (gc) {
            case 8: THAW_VALUES(8); break;
            case 7: THAW_VALUES(7); break;
            case 6: THAW_VALUES(6); break;
            case 5: THAW_VALUES(5); break;
            case 4: THAW_VALUES(4); break;
            case 3: THAW_VALUES(3); break;
            case 2: THAW_VALUES(2); break;
            default: THAW_VALUES(1); break;
            }
#undef THAW_VALUES
        }
    }
}
#endif

/*
 * One (sequence, kv head) of decode attention: scores of every query head of the group against
 * the keys at positions first .. len - 1 (soft-capped when softcap > 0), softmax in float32,
 * then the weighted sum of values. Always inlined and called with a literal head_dim for the
 * common sizes, so the row loops compile to fixed SIMD sequences instead of generic loops with
 * peeling and remainders.
 */
static inline __attribute__((always_inline)) void attend_one_generic(
    bf16 *out, const bf16 *q, const bf16 *k_cache, const bf16 *v_cache, const int32_t *table,
    int64_t first, int64_t len, int64_t group, int64_t kv_width, int64_t block_size, float scale,
    float softcap, float *scratch, int64_t head_dim) {
    const int64_t n = len - first;
    float *qf = scratch, *acc = qf + group * head_dim, *row = acc + group * head_dim;
    float *scores = row + head_dim;
    for (int64_t g = 0; g < group; g++) {
        widen(q + g * head_dim, qf + g * head_dim, head_dim);
#pragma omp simd
        for (int64_t d = 0; d < head_dim; d++) qf[g * head_dim + d] *= scale;
    }
    for (int64_t j = 0; j < n; j++) {
        int64_t pos = first + j;
        int64_t slot = (int64_t)table[pos / block_size] * block_size + pos % block_size;
        widen(k_cache + slot * kv_width, row, head_dim);
        for (int64_t g = 0; g < group; g++) {
            const float *qg = qf + g * head_dim;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; d++) dot += qg[d] * row[d];
            scores[g * n + j] = softcap > 0.0f ? softcap * tanhf(dot / softcap) : dot;
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *sg = scores + g * n;
        float peak = -INFINITY;
        for (int64_t j = 0; j < n; j++) peak = sg[j] > peak ? sg[j] : peak;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < n; j++) {
            sg[j] = approx_expf(sg[j] - peak);
            total += sg[j];
        }
        float inv = 1.0f / total;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) sg[j] *= inv;
    }
    memset(acc, 0, sizeof(float) * (size_t)(group * head_dim));
    for (int64_t j = 0; j < n; j++) {
        int64_t pos = first + j;
        int64_t slot = (int64_t)table[pos / block_size] * block_size + pos % block_size;
        widen(v_cache + slot * kv_width, row, head_dim);
        for (int64_t g = 0; g < group; g++) {
            float p = scores[g * n + j];
            float *ag = acc + g * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) ag[d] += p * row[d];
        }
    }
    for (int64_t g = 0; g < group; g++) {
        for (int64_t d = 0; d < head_dim; d++) out[g * head_dim + d] = f32_to_bf16(acc[g * head_dim + d]);
    }
}

/*
 * Decode attention over the paged cache, one query token per sequence, GQA.
 * q: [seqs, heads * head_dim] rows `q_stride` apart; out: [seqs, heads * head_dim] contiguous.
 * Cache: [blocks, block_size, kv_heads, head_dim]. Sequence s attends to its first
 * context_lens[s] tokens, token j in block block_tables[s * table_stride + j / block_size];
 * with window > 0 to its last `window` of them only: the query (the context's last token, at
 * position len - 1) sees positions > len - 1 - window, and table entries before those are never
 * read (a window group's released blocks). softcap > 0: scores -> softcap * tanh(scores /
 * softcap) before the softmax.
 * One task per (sequence, kv head): each key and value row is widened once and used by every
 * query head of the group. Softmax in float32 over the attended keys (two passes).
 * Returns 0, or -1 when a scratch allocation failed (out is then incomplete).
 */
int thaw_paged_decode_attention(bf16 *out, const bf16 *q, int64_t q_stride, const bf16 *k_cache,
                                const bf16 *v_cache, const int32_t *block_tables,
                                int64_t table_stride, const int32_t *context_lens, int64_t seqs,
                                int64_t heads, int64_t kv_heads, int64_t head_dim,
                                int64_t block_size, float scale, int64_t window, float softcap) {
    int64_t group = heads / kv_heads;
    int64_t kv_width = kv_heads * head_dim;
    int failed = 0;
#ifdef THAW_AVX512_BF16
    if (head_dim % 32 == 0 && head_dim <= 256) {
        /* A task per sequence when there are enough of them to share out (its KV heads then
         * read the cache rows in order), else per (sequence, KV head). */
        int64_t nkv = seqs >= 8 ? kv_heads : 1;
        int64_t parts = kv_heads / nkv;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
        for (int64_t s = 0; s < seqs; s++) {
            for (int64_t part = 0; part < parts; part++) {
                int64_t len = context_lens[s];
                int64_t first = window > 0 && len > window ? len - window : 0;
                int64_t stride = (len - first + 15) & ~(int64_t)15;
                float *scores = malloc(sizeof(float) * (size_t)(nkv * group * (stride + 1)));
                if (scores == NULL) {
                    failed = 1;
                    continue;
                }
                int64_t kv0 = part * nkv; /* first KV head of this task */
                bf16 *o = out + s * heads * head_dim + kv0 * group * head_dim;
                const bf16 *qs = q + s * q_stride + kv0 * group * head_dim;
                const bf16 *kc = k_cache + kv0 * head_dim, *vc = v_cache + kv0 * head_dim;
                const int32_t *table = block_tables + s * table_stride;
                if (head_dim == 64)
                    attend_avx512(o, qs, kc, vc, table, first, len, nkv, group, kv_width, block_size,
                                  scale, softcap, scores, 64);
                else
                    attend_avx512(o, qs, kc, vc, table, first, len, nkv, group, kv_width, block_size,
                                  scale, softcap, scores, head_dim);
                free(scores);
            }
        }
        return failed ? -1 : 0;
    }
#endif
#pragma omp parallel for collapse(2) schedule(dynamic, 4)
    for (int64_t s = 0; s < seqs; s++) {
        for (int64_t kh = 0; kh < kv_heads; kh++) {
            int64_t len = context_lens[s];
            int64_t first = window > 0 && len > window ? len - window : 0;
            /* query rows, accumulators, one widened K/V row, then scores [group][len - first] */
            size_t floats = (size_t)(2 * group * head_dim + head_dim + group * (len - first));
            float *scratch = malloc(sizeof(float) * floats);
            if (scratch == NULL) {
                failed = 1;
                continue;
            }
            bf16 *o = out + s * heads * head_dim + kh * group * head_dim;
            const bf16 *qs = q + s * q_stride + kh * group * head_dim;
            const bf16 *kc = k_cache + kh * head_dim, *vc = v_cache + kh * head_dim;
            const int32_t *table = block_tables + s * table_stride;
            if (head_dim == 64)
                attend_one_generic(o, qs, kc, vc, table, first, len, group, kv_width, block_size,
                                   scale, softcap, scratch, 64);
            else
                attend_one_generic(o, qs, kc, vc, table, first, len, group, kv_width, block_size,
                                   scale, softcap, scratch, head_dim);
            free(scratch);
        }
    }
    return failed ? -1 : 0;
}

/*
 * Gated activation over rows of [gate | up] (each `inter` wide), one rounding (torch's
 * activation then mul rounds twice):
 *   gelu_tanh = 0: out = bf16(silu(gate) * up)            (Llama's SwiGLU)
 *   gelu_tanh = 1: out = bf16(gelu_tanh(gate) * up)       (Gemma's GeGLU)
 * Both are g * sigmoid(a): silu has a = g, and gelu's 0.5 * (1 + tanh(u)) is sigmoid(2u) with
 * u = sqrt(2 / pi) * (g + 0.044715 g^3), so one loop serves both.
 */
void thaw_gated_mul(const bf16 *gate_up, int64_t rows, int64_t inter, bf16 *out, int gelu_tanh) {
    const float k1 = 2.0f * 0.7978845608028654f, k3 = k1 * 0.044715f;
#pragma omp parallel for schedule(static) if (rows * inter >= THAW_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *gate = gate_up + r * 2 * inter, *up = gate + inter;
        bf16 *o = out + r * inter;
        int64_t i = 0;
#ifdef THAW_AVX512_BF16
        const __m512 c1 = _mm512_set1_ps(k1), c3 = _mm512_set1_ps(k3);
        for (; i + 16 <= inter; i += 16) {
            __m512 g = widen16(gate + i);
            __m512 a = gelu_tanh ? _mm512_mul_ps(g, _mm512_fmadd_ps(_mm512_mul_ps(g, g), c3, c1)) : g;
            __m512 act = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
            __m256bh product = _mm512_cvtneps_pbh(_mm512_mul_ps(act, widen16(up + i)));
            _mm256_storeu_si256((__m256i *)(o + i), (__m256i)product);
        }
#endif
        for (; i < inter; i++) {
            float g = bf16_to_f32(gate[i]);
            float a = gelu_tanh ? g * (k1 + k3 * g * g) : g;
            o[i] = f32_to_bf16(g / (1.0f + approx_expf(-a)) * bf16_to_f32(up[i]));
        }
    }
}

/*
 * log(sum(exp(row))) of each row of bf16 logits [rows, vocab], in float32: the normaliser of
 * the chosen token's logprob, without materialising a float32 log_softmax of the whole vocabulary.
 */
void thaw_logsumexp_rows(const bf16 *logits, int64_t rows, int64_t vocab, float *lse) {
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *row = logits + r * vocab;
        float peak = -INFINITY, total = 0.0f;
        int64_t i = 0;
#ifdef THAW_AVX512_BF16
        __m512 vpeak = _mm512_set1_ps(-INFINITY);
        for (; i + 16 <= vocab; i += 16) vpeak = _mm512_max_ps(vpeak, widen16(row + i));
        peak = _mm512_reduce_max_ps(vpeak);
        for (int64_t t = i; t < vocab; t++) peak = fmaxf(peak, bf16_to_f32(row[t]));
        if (isinf(peak)) { /* all -inf (or +inf present): no finite normaliser */
            lse[r] = peak;
            continue;
        }
        __m512 top = _mm512_set1_ps(peak), vtotal = _mm512_setzero_ps();
        for (i = 0; i + 16 <= vocab; i += 16) vtotal = _mm512_add_ps(vtotal, exp16(_mm512_sub_ps(widen16(row + i), top)));
        total = _mm512_reduce_add_ps(vtotal);
#else
        for (int64_t t = 0; t < vocab; t++) peak = fmaxf(peak, bf16_to_f32(row[t]));
        if (isinf(peak)) {
            lse[r] = peak;
            continue;
        }
#endif
        for (; i < vocab; i++) total += approx_expf(bf16_to_f32(row[i]) - peak);
        lse[r] = peak + logf(total);
    }
}

/*
 * Grammar masks, in place: for each i < n, logits row rows[i] (or row i when rows is NULL) of
 * `vocab` values (float32, or bf16 when is_bf16) gets -inf at every token whose bit is clear in
 * bits[i] (`words` int32 words, bit j of word w = token 32 w + j). Tokens at or past 32 * words
 * (padded embedding rows the tokenizer never names) get -inf too. Why: unpacking the bits into
 * a [rows, vocab] bool tensor and masked_fill writes and reads several times the logits' size;
 * here an all-ones word is skipped and a zero word is one run of stores.
 */
void thaw_apply_token_mask(void *logits, int64_t vocab, int is_bf16, const int64_t *rows,
                           int64_t n, const int32_t *bits, int64_t words) {
    int64_t covered = words * 32 < vocab ? words * 32 : vocab;
#pragma omp parallel for schedule(static) if (n * vocab >= THAW_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        int64_t r = rows != NULL ? rows[i] : i;
        const uint32_t *mask = (const uint32_t *)bits + i * words;
        if (is_bf16) {
            bf16 *row = (bf16 *)logits + r * vocab;
            const bf16 neg = 0xff80u; /* -inf */
            int64_t t = 0;
            for (; t + 32 <= covered; t += 32) {
                uint32_t word = mask[t / 32];
                if (word == 0xffffffffu) continue;
#ifdef __AVX512BW__
                /* One store of -inf to the lanes whose bit is clear. */
                _mm512_mask_storeu_epi16(row + t, (__mmask32)~word, _mm512_set1_epi16((short)neg));
#else
                if (word == 0) {
                    for (int j = 0; j < 32; j++) row[t + j] = neg;
                } else {
                    for (int j = 0; j < 32; j++)
                        if (!((word >> j) & 1u)) row[t + j] = neg;
                }
#endif
            }
            for (; t < covered; t++)
                if (!((mask[t / 32] >> (t % 32)) & 1u)) row[t] = neg;
            for (; t < vocab; t++) row[t] = neg;
        } else {
            float *row = (float *)logits + r * vocab;
            int64_t t = 0;
            for (; t + 32 <= covered; t += 32) {
                uint32_t word = mask[t / 32];
                if (word == 0xffffffffu) continue;
#ifdef __AVX512F__
                __m512 neg = _mm512_set1_ps(-INFINITY);
                _mm512_mask_storeu_ps(row + t, (__mmask16)~word, neg);
                _mm512_mask_storeu_ps(row + t + 16, (__mmask16)(~word >> 16), neg);
#else
                if (word == 0) {
                    for (int j = 0; j < 32; j++) row[t + j] = -INFINITY;
                } else {
                    for (int j = 0; j < 32; j++)
                        if (!((word >> j) & 1u)) row[t + j] = -INFINITY;
                }
#endif
            }
            for (; t < covered; t++)
                if (!((mask[t / 32] >> (t % 32)) & 1u)) row[t] = -INFINITY;
            for (; t < vocab; t++) row[t] = -INFINITY;
        }
    }
}
