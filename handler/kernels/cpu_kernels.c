/*
 * Fused CPU kernels for the bfloat16 serving path (handler/kernels/cpu.py binds them).
 *
 * Why: a decode step of 32 sequences spends as long in ~25 small torch ops per layer
 * (gathering paged KV into padded tensors, transposes, masks, norms in several passes) as in
 * the matmuls that move the weights. Each kernel here replaces a chain of those ops with one
 * pass over the data, reading the paged cache in place.
 *
 * Conventions: bf16 tensors are uint16_t, contiguous rows with the strides given; all math in
 * float32, rounded to bf16 (nearest-even) once per stored value, except where a comment says it
 * follows Hugging Face's rounding points. OpenMP shares torch's runtime (same libgomp soname),
 * so these loops run on torch's thread pool with its thread count.
 */
#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
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

int thaw_kernels_abi(void) { return 1; }

/* Bit 0: compiled with the AVX-512 BF16 attention path. */
int thaw_kernels_features(void) {
#ifdef THAW_AVX512_BF16
    return 1;
#else
    return 0;
#endif
}

/*
 * RMS norm with an optional residual add first, over rows of `dim`:
 *   if delta: hidden += delta (rounded to bf16, as torch's bf16 add: the residual stream)
 *   out = bf16(hidden * rsqrt(mean(hidden^2) + eps) * weight), one rounding
 * (transformers rounds before the weight too; one rounding is closer to float32, and measured
 * so: tests/test_engine_cpu_kernels.py).
 */
void thaw_add_rms_norm(bf16 *hidden, const bf16 *delta, const bf16 *weight, bf16 *out,
                       int64_t rows, int64_t dim, float eps) {
#pragma omp parallel for schedule(static) if (rows > 4)
    for (int64_t r = 0; r < rows; r++) {
        bf16 *h = hidden + r * dim;
        if (delta != NULL) {
            const bf16 *d = delta + r * dim;
            for (int64_t i = 0; i < dim; i++) h[i] = f32_to_bf16(bf16_to_f32(h[i]) + bf16_to_f32(d[i]));
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < dim; i++) {
            float x = bf16_to_f32(h[i]);
            sum += x * x;
        }
        float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        bf16 *o = out + r * dim;
        for (int64_t i = 0; i < dim; i++) o[i] = f32_to_bf16(bf16_to_f32(h[i]) * inv * bf16_to_f32(weight[i]));
    }
}

/*
 * Rotary embedding in place, "rotate half" layout, on `heads` heads of each row of x:
 *   x[i] = x[i] * cos - x[i + half] * sin,  x[i + half] = x[i + half] * cos + x[i] * sin
 * cos/sin: float32 [max_positions, half] per frequency.
 */
void thaw_rotary(bf16 *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t head_dim,
                 const int64_t *positions, const float *cos_table, const float *sin_table) {
    int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (rows > 4)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_table + positions[r] * half;
        const float *s = sin_table + positions[r] * half;
        for (int64_t h = 0; h < heads; h++) {
            bf16 *v = x + r * row_stride + h * head_dim;
            for (int64_t i = 0; i < half; i++) {
                float a = bf16_to_f32(v[i]), b = bf16_to_f32(v[i + half]);
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
 * The cache rows of one step are cold (the step streamed all the weights since they were last
 * read), and a KV head's rows are kv_width apart: too sparse for the hardware prefetcher.
 * Fetch rows this far ahead.
 */
#define PREFETCH_ROWS 8
static inline void prefetch_row(const bf16 *cache, const int32_t *table, int64_t j, int64_t len,
                                int64_t block_size, int64_t kv_width, int64_t width) {
    if (j >= len) return;
    const char *row = (const char *)(cache + ((int64_t)table[j / block_size] * block_size + j % block_size) * kv_width);
    for (int64_t byte = 0; byte < width * (int64_t)sizeof(bf16); byte += 64) _mm_prefetch(row + byte, _MM_HINT_T0);
}

static inline __m512 widen16(const bf16 *src) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/*
 * Decode attention of one sequence for `nkv` consecutive KV heads (all of them, or one) with
 * AVX-512: q.k by vdpbf16ps (bf16 pairs multiplied exactly, summed in float32), 16-lane
 * softmax, values widened and accumulated in float32. Taking every KV head of a sequence reads
 * its cache rows whole and in order, which the hardware prefetcher streams well. head_dim must
 * be a multiple of 32 and nkv * group * head_dim / 16 at most ACC_REGS (the caller checks).
 */
#define ACC_REGS 512
static inline __attribute__((always_inline)) void attend_avx512(
    bf16 *out, const bf16 *q, const bf16 *k_cache, const bf16 *v_cache, const int32_t *table,
    int64_t len, int64_t nkv, int64_t group, int64_t kv_width, int64_t block_size, float scale,
    float *scores, int64_t head_dim) {
    const int64_t pairs = head_dim / 32; /* 32 bf16 per vdpbf16ps */
    const int64_t lanes = head_dim / 16; /* 16 floats per register */
    const int64_t heads = nkv * group;
    for (int64_t j = 0; j < len; j++) {
        int64_t slot = (int64_t)table[j / block_size] * block_size + j % block_size;
        const bf16 *krow = k_cache + slot * kv_width;
        prefetch_row(k_cache, table, j + PREFETCH_ROWS, len, block_size, kv_width, nkv * head_dim);
        for (int64_t h = 0; h < heads; h++) {
            const bf16 *qh = q + h * head_dim, *kh = krow + (h / group) * head_dim;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < pairs; c++) {
                __m512bh qv = (__m512bh)_mm512_loadu_si512((const void *)(qh + 32 * c));
                __m512bh kv = (__m512bh)_mm512_loadu_si512((const void *)(kh + 32 * c));
                acc = _mm512_dpbf16_ps(acc, qv, kv);
            }
            scores[h * len + j] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    for (int64_t h = 0; h < heads; h++) {
        float *sg = scores + h * len;
        __m512 peak = _mm512_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 16 <= len; j += 16) peak = _mm512_max_ps(peak, _mm512_loadu_ps(sg + j));
        __mmask16 tail = (__mmask16)((1u << (len - j)) - 1u);
        peak = _mm512_mask_max_ps(peak, tail, peak, _mm512_maskz_loadu_ps(tail, sg + j));
        __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(peak));
        __m512 total = _mm512_setzero_ps();
        for (j = 0; j + 16 <= len; j += 16) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sg + j), top));
            _mm512_storeu_ps(sg + j, e);
            total = _mm512_add_ps(total, e);
        }
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sg + j), top));
        _mm512_mask_storeu_ps(sg + j, tail, e);
        total = _mm512_mask_add_ps(total, tail, total, e);
        float inv = 1.0f / _mm512_reduce_add_ps(total);
        for (j = 0; j < len; j++) sg[j] *= inv;
    }
    __m512 acc[ACC_REGS]; /* [heads][lanes] */
    for (int64_t i = 0; i < heads * lanes; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j++) {
        int64_t slot = (int64_t)table[j / block_size] * block_size + j % block_size;
        const bf16 *vrow = v_cache + slot * kv_width;
        prefetch_row(v_cache, table, j + PREFETCH_ROWS, len, block_size, kv_width, nkv * head_dim);
        for (int64_t kv = 0; kv < nkv; kv++) {
            __m512 v[16];
            for (int64_t c = 0; c < lanes; c++) v[c] = widen16(vrow + kv * head_dim + 16 * c);
            for (int64_t g = 0; g < group; g++) {
                int64_t h = kv * group + g;
                __m512 p = _mm512_set1_ps(scores[h * len + j]);
                for (int64_t c = 0; c < lanes; c++)
                    acc[h * lanes + c] = _mm512_fmadd_ps(p, v[c], acc[h * lanes + c]);
            }
        }
    }
    for (int64_t h = 0; h < heads; h++) {
        for (int64_t c = 0; c < lanes; c++) {
            float lane[16];
            _mm512_storeu_ps(lane, acc[h * lanes + c]);
            for (int64_t d = 0; d < 16; d++) out[h * head_dim + 16 * c + d] = f32_to_bf16(lane[d]);
        }
    }
}
#endif

/*
 * One (sequence, kv head) of decode attention: scores of every query head of the group against
 * the context's keys, softmax in float32, then the weighted sum of values. Always inlined and
 * called with a literal head_dim for the common sizes, so the row loops compile to fixed SIMD
 * sequences instead of generic loops with peeling and remainders.
 */
static inline __attribute__((always_inline)) void attend_one_generic(
    bf16 *out, const bf16 *q, const bf16 *k_cache, const bf16 *v_cache, const int32_t *table,
    int64_t len, int64_t group, int64_t kv_width, int64_t block_size, float scale,
    float *scratch, int64_t head_dim) {
    float *qf = scratch, *acc = qf + group * head_dim, *row = acc + group * head_dim;
    float *scores = row + head_dim;
    for (int64_t g = 0; g < group; g++) {
        widen(q + g * head_dim, qf + g * head_dim, head_dim);
#pragma omp simd
        for (int64_t d = 0; d < head_dim; d++) qf[g * head_dim + d] *= scale;
    }
    for (int64_t j = 0; j < len; j++) {
        int64_t slot = (int64_t)table[j / block_size] * block_size + j % block_size;
        widen(k_cache + slot * kv_width, row, head_dim);
        for (int64_t g = 0; g < group; g++) {
            const float *qg = qf + g * head_dim;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; d++) dot += qg[d] * row[d];
            scores[g * len + j] = dot;
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *sg = scores + g * len;
        float peak = -INFINITY;
        for (int64_t j = 0; j < len; j++) peak = sg[j] > peak ? sg[j] : peak;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < len; j++) {
            sg[j] = approx_expf(sg[j] - peak);
            total += sg[j];
        }
        float inv = 1.0f / total;
#pragma omp simd
        for (int64_t j = 0; j < len; j++) sg[j] *= inv;
    }
    memset(acc, 0, sizeof(float) * (size_t)(group * head_dim));
    for (int64_t j = 0; j < len; j++) {
        int64_t slot = (int64_t)table[j / block_size] * block_size + j % block_size;
        widen(v_cache + slot * kv_width, row, head_dim);
        for (int64_t g = 0; g < group; g++) {
            float p = scores[g * len + j];
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
 * context_lens[s] tokens, token j in block block_tables[s * table_stride + j / block_size].
 * One task per (sequence, kv head): each key and value row is widened once and used by every
 * query head of the group. Softmax in float32 over the whole context (two passes).
 * Returns 0, or -1 when a scratch allocation failed (out is then incomplete).
 */
int thaw_paged_decode_attention(bf16 *out, const bf16 *q, int64_t q_stride, const bf16 *k_cache,
                                const bf16 *v_cache, const int32_t *block_tables,
                                int64_t table_stride, const int32_t *context_lens, int64_t seqs,
                                int64_t heads, int64_t kv_heads, int64_t head_dim,
                                int64_t block_size, float scale) {
    int64_t group = heads / kv_heads;
    int64_t kv_width = kv_heads * head_dim;
    int failed = 0;
#ifdef THAW_AVX512_BF16
    if (head_dim % 32 == 0 && group * (head_dim / 16) <= ACC_REGS) {
        /* A task per sequence when there are enough of them to share out, else per KV head. */
        int64_t nkv = seqs >= 8 && heads * (head_dim / 16) <= ACC_REGS ? kv_heads : 1;
        int64_t parts = kv_heads / nkv;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
        for (int64_t s = 0; s < seqs; s++) {
            for (int64_t part = 0; part < parts; part++) {
                int64_t len = context_lens[s];
                float *scores = malloc(sizeof(float) * (size_t)(nkv * group * len));
                if (scores == NULL) {
                    failed = 1;
                    continue;
                }
                int64_t first = part * nkv; /* first KV head of this task */
                bf16 *o = out + s * heads * head_dim + first * group * head_dim;
                const bf16 *qs = q + s * q_stride + first * group * head_dim;
                const bf16 *kc = k_cache + first * head_dim, *vc = v_cache + first * head_dim;
                const int32_t *table = block_tables + s * table_stride;
                if (head_dim == 64)
                    attend_avx512(o, qs, kc, vc, table, len, nkv, group, kv_width, block_size, scale, scores, 64);
                else
                    attend_avx512(o, qs, kc, vc, table, len, nkv, group, kv_width, block_size, scale, scores,
                                  head_dim);
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
            /* query rows, accumulators, one widened K/V row, then scores [group][len] */
            size_t floats = (size_t)(2 * group * head_dim + head_dim + group * len);
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
                attend_one_generic(o, qs, kc, vc, table, len, group, kv_width, block_size, scale,
                                   scratch, 64);
            else
                attend_one_generic(o, qs, kc, vc, table, len, group, kv_width, block_size, scale,
                                   scratch, head_dim);
            free(scratch);
        }
    }
    return failed ? -1 : 0;
}

/*
 * SiLU-and-multiply over rows of [gate | up] (each `inter` wide):
 *   out = bf16(silu(gate) * up), one rounding (torch's silu then mul rounds twice).
 */
void thaw_silu_mul(const bf16 *gate_up, int64_t rows, int64_t inter, bf16 *out) {
#pragma omp parallel for schedule(static) if (rows * inter > 4096)
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *gate = gate_up + r * 2 * inter, *up = gate + inter;
        bf16 *o = out + r * inter;
        int64_t i = 0;
#ifdef THAW_AVX512_BF16
        for (; i + 16 <= inter; i += 16) {
            __m512 g = widen16(gate + i);
            __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            __m256bh product = _mm512_cvtneps_pbh(_mm512_mul_ps(silu, widen16(up + i)));
            _mm256_storeu_si256((__m256i *)(o + i), (__m256i)product);
        }
#endif
        for (; i < inter; i++) {
            float g = bf16_to_f32(gate[i]);
            o[i] = f32_to_bf16(g / (1.0f + approx_expf(-g)) * bf16_to_f32(up[i]));
        }
    }
}

/*
 * log(sum(exp(row))) of each row of bf16 logits [rows, vocab], in float32: the normaliser of
 * the chosen token's logprob, without materialising a float32 log_softmax of the whole vocabulary.
 */
void thaw_logsumexp_rows(const bf16 *logits, int64_t rows, int64_t vocab, float *lse) {
#pragma omp parallel for schedule(static)
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
