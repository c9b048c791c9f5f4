/*
 * Weight-only int8 / int4 matrix multiply: C[m, n] = A[m, k] . W[n, k]^T (+ bias), A bf16,
 * W stored quantized (snapshot/quant/format.py: W[r, c] = q * s + o, one s and o per group of
 * g columns of a row), float32 accumulation, one rounding to bf16 per output.
 *
 * Why: decode multiplies few rows by weights that do not fit in cache, so its time is the time
 * to read the weights. int8 halves those bytes and int4 quarters them; de-quantizing costs about
 * eight vector operations per 32 weights, which is what bounds it where one core reads memory
 * fast (as on the AMD EPYC it was measured on): there int8 and int4 both run at 35-40 G weights
 * a second a core, against bf16's 20 (40 GB/s).
 *
 * Numerics are those of thaw_gemm (cpu_gemm.c) run on the de-quantized weight: each weight is
 * q * s, then + o (two float32 roundings, as torch computes QuantizedTensor.dequantize; one FMA
 * only where q * s is exact, which rounds the same), rounded to bf16 to nearest even
 * (VCVTNE2PS2BF16, torch's float -> bf16), and the products are summed in gemm_tile's order. So
 * the result is bit-identical to thaw_gemm on dequantize(float32).to(bf16) (the tests check it).
 * This relies on -std=c11's default -ffp-contract=off: a contracted q * s + o would round once.
 *
 * Packed layout: [ceil(n / 48) panels][ceil(k / g) groups] of {scales [48], offsets [48] when
 * present, in the source's float16 or float32; then the group's g / 2 k-pairs x 48 columns}, so a
 * panel streams in order. int8: a pair is [48 columns][2] int8, as the bf16 panel interleaves it.
 * int4: a pair is 3 x 16 bytes, one per 16 columns; byte i holds pair element i of columns 0..7
 * (column i / 2, k i % 2) in its low nibble and of columns 8..15 in its high one: one widening
 * load, then the low nibbles and the shifted high ones are the two float32 halves of a 32-value
 * bf16 register. The last group may be shorter (k % g); columns past n are zero (q 0, scale 0).
 *
 * How: rows <= 8 (decode) de-quantize each k-pair into registers and multiply it into every row
 * at once, never storing the bf16 weight. More rows de-quantize a panel into a per-thread bf16
 * scratch in thaw_gemm's panel layout (it stays in L2) and run every 8-row tile over it, so the
 * conversion is paid once per panel, not once per tile.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_gemm_tile.h"
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define THAW_QGEMM 1
#endif

/* PREFETCH_AHEAD: how far ahead of its reads the decode path asks for the packed weight (into
 * L1; past the buffer's end is harmless, prefetches do not fault). The hardware prefetcher alone
 * leaves it waiting on memory; 8 KiB measured best on an AMD EPYC (2, 4, 8, 16 KiB: int8 at
 * about 1.5x, 1.6x, 1.8x, 1.8x bf16's speed, one thread). */
enum { PREFETCH_AHEAD = 8192 };

/* flags: bit 0 int4 (else int8), bit 1 float16 scales/offsets (else float32), bit 2 offsets,
 * bit 3 every q * s is exact in float32 (see dequant), so q * s + o may be one FMA. */
enum { Q_INT4 = 1, Q_HALF = 2, Q_OFFSETS = 4, Q_FMA = 8 };

int thaw_qgemm_available(void) {
#ifdef THAW_QGEMM
    return 1;
#else
    return 0;
#endif
}

static int64_t meta_bytes(int flags) {
    return PANEL_COLS * (flags & Q_HALF ? 2 : 4) * (flags & Q_OFFSETS ? 2 : 1);
}

static int64_t pair_bytes(int flags) { return flags & Q_INT4 ? PANEL_COLS : 2 * PANEL_COLS; }

static int64_t panel_bytes(int64_t k, int64_t group, int flags) {
    return (k + group - 1) / group * meta_bytes(flags) + k / 2 * pair_bytes(flags);
}

/* Bytes a packed weight of [n, k] (k even, group even) takes. */
int64_t thaw_qgemm_packed_bytes(int64_t n, int64_t k, int64_t group, int flags) {
    return (n + PANEL_COLS - 1) / PANEL_COLS * panel_bytes(k, group, flags);
}

/* The q value (int8 or a 0..15 nibble) of W[col, kk]; 0 past n. */
static inline int quant_at(const void *qweight, int64_t n, int64_t k, int flags, int64_t col,
                           int64_t kk) {
    if (col >= n) return 0;
    if (flags & Q_INT4) {
        uint8_t byte = ((const uint8_t *)qweight)[col * (k / 2) + kk / 2];
        return kk & 1 ? byte >> 4 : byte & 15;
    }
    return ((const int8_t *)qweight)[col * k + kk];
}

/*
 * qweight: int8 [n, k] or uint8 [n, k / 2]; scales, offsets (NULL: none): [n, ceil(k / g)]
 * float16 or float32 (flags) -> out, the packed layout above.
 */
void thaw_qgemm_pack(const void *qweight, const void *scales, const void *offsets, int64_t n,
                     int64_t k, int64_t group, int flags, uint8_t *out) {
    int64_t panels = (n + PANEL_COLS - 1) / PANEL_COLS, groups = (k + group - 1) / group;
    int64_t size = flags & Q_HALF ? 2 : 4, pb = pair_bytes(flags);
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        uint8_t *dst = out + p * panel_bytes(k, group, flags);
        for (int64_t g = 0; g < groups; g++) {
            const void *parts[2] = {scales, offsets};
            for (int part = 0; part < (flags & Q_OFFSETS ? 2 : 1); part++) {
                for (int64_t j = 0; j < PANEL_COLS; j++, dst += size) {
                    int64_t col = p * PANEL_COLS + j;
                    if (col < n)
                        memcpy(dst, (const uint8_t *)parts[part] + (col * groups + g) * size, size);
                    else
                        memset(dst, 0, size);
                }
            }
            int64_t k1 = (g + 1) * group < k ? (g + 1) * group : k;
            for (int64_t kk = g * group; kk < k1; kk += 2, dst += pb) {
                for (int64_t j = 0; j < PANEL_COLS; j++) {
                    int64_t col = p * PANEL_COLS + j;
                    if (flags & Q_INT4) {
                        /* Block j / 16, byte i = j % 16: columns i / 2 and 8 + i / 2, k i % 2. */
                        int64_t block = j / 16, i = j % 16;
                        int64_t c0 = p * PANEL_COLS + block * 16 + i / 2;
                        int lo = quant_at(qweight, n, k, flags, c0, kk + (i & 1));
                        int hi = quant_at(qweight, n, k, flags, c0 + 8, kk + (i & 1));
                        dst[j] = (uint8_t)(lo | hi << 4);
                    } else {
                        dst[2 * j] = (uint8_t)quant_at(qweight, n, k, flags, col, kk);
                        dst[2 * j + 1] = (uint8_t)quant_at(qweight, n, k, flags, col, kk + 1);
                    }
                }
            }
        }
    }
}

#ifdef THAW_QGEMM
/* A group's 48 scales (or offsets) as 6 vectors, each column's value twice (k0, k1), in the
 * order of the float32 halves that make up the three 32-value bf16 registers. */
static inline void expand_meta(const uint8_t *src, int half, __m512 out[6]) {
    const __m512i lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i hi = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9,
                                        8, 8);
    for (int b = 0; b < 3; b++) {
        __m512 v = half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + b * 32)))
                        : _mm512_loadu_ps(src + b * 64);
        out[2 * b] = _mm512_permutexvar_ps(lo, v);
        out[2 * b + 1] = _mm512_permutexvar_ps(hi, v);
    }
}

/*
 * One bf16 register (16 columns x one k-pair) from its quantized values: q * s (+ o).
 * int4 turns nibbles into floats by table: VPERMPS reads only an index's low 4 bits, so the
 * widened byte indexes [0.0 .. 15.0] by its low nibble as it is (no mask) and by its high one
 * after a shift.
 */
static inline __attribute__((always_inline)) __m512bh dequant(
    const int int4, const int offs, const uint8_t *q, int b, const __m512 *s, const __m512 *o) {
    __m512 lo, hi;
    if (int4) {
        const __m512 values = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + b * 16)));
        lo = _mm512_permutexvar_ps(x, values);
        hi = _mm512_permutexvar_ps(_mm512_srli_epi32(x, 4), values);
    } else {
        __m512i l = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + b * 32)));
        __m512i h = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + b * 32 + 16)));
        lo = _mm512_cvtepi32_ps(l);
        hi = _mm512_cvtepi32_ps(h);
    }
    if (offs == 2) {
        /* Where q * s is exact (a float16 scale has 11 significant bits, q at most 8, and
         * float32 holds 24), the FMA's one rounding is the two of mul-then-add: same weight,
         * two operations fewer per register. pack_qgemm_weight sets the flag only then
         * (float16 scales, or float32 ones with as few significant bits). */
        lo = _mm512_fmadd_ps(lo, s[2 * b], o[2 * b]);
        hi = _mm512_fmadd_ps(hi, s[2 * b + 1], o[2 * b + 1]);
    } else {
        lo = _mm512_mul_ps(lo, s[2 * b]);
        hi = _mm512_mul_ps(hi, s[2 * b + 1]);
        if (offs) {
            lo = _mm512_add_ps(lo, o[2 * b]);
            hi = _mm512_add_ps(hi, o[2 * b + 1]);
        }
    }
    /* Elements 0..15 from lo (columns 0..7), 16..31 from hi: round to nearest even. */
    return _mm512_cvtne2ps_pbh(hi, lo);
}

/* rows (1..8) of A times one packed panel, de-quantizing each k-pair straight into registers. */
static inline __attribute__((always_inline)) void fused_tile(
    const int rows, const int int4, const int offs, const bf16 *a, int64_t lda,
    const uint8_t *panel, int64_t k, int64_t group, int half, const float *bias, bf16 *c,
    int64_t ldc, int64_t cols) {
    __m512 acc[TILE_ROWS][3];
    tile_zero(rows, acc);
    const int flags = (int4 ? Q_INT4 : 0) | (half ? Q_HALF : 0) | (offs ? Q_OFFSETS : 0);
    const int64_t pb = pair_bytes(flags), mb = meta_bytes(flags);
    const uint8_t *src = panel;
    for (int64_t k0 = 0; k0 < k; k0 += group) {
        __m512 s[6], o[6];
        for (int64_t off = 0; off < mb; off += 64)
            _mm_prefetch((const char *)src + PREFETCH_AHEAD + off, _MM_HINT_T0);
        expand_meta(src, half, s);
        if (offs) expand_meta(src + mb / 2, half, o);
        src += mb;
        int64_t q1 = (k0 + group < k ? k0 + group : k) / 2;
        for (int64_t q = k0 / 2; q < q1; q++, src += pb) {
            /* A pair is 96 (int8) or 48 (int4) bytes: two lines or one ask for all of them. */
            _mm_prefetch((const char *)src + PREFETCH_AHEAD, _MM_HINT_T0);
            if (!int4) _mm_prefetch((const char *)src + PREFETCH_AHEAD + 64, _MM_HINT_T0);
            __m512bh w0 = dequant(int4, offs, src, 0, s, o);
            __m512bh w1 = dequant(int4, offs, src, 1, s, o);
            __m512bh w2 = dequant(int4, offs, src, 2, s, o);
            tile_pair(rows, acc, a, lda, q, w0, w1, w2);
        }
    }
    tile_store(rows, acc, bias, c, ldc, cols);
}

/* A packed panel -> thaw_gemm's bf16 panel, [k / 2 pairs][48 columns][2]. */
static inline __attribute__((always_inline)) void dequant_panel(
    const int int4, const int offs, const uint8_t *panel, int64_t k, int64_t group, int half,
    bf16 *out) {
    const int flags = (int4 ? Q_INT4 : 0) | (half ? Q_HALF : 0) | (offs ? Q_OFFSETS : 0);
    const int64_t pb = pair_bytes(flags), mb = meta_bytes(flags);
    const uint8_t *src = panel;
    for (int64_t k0 = 0; k0 < k; k0 += group) {
        __m512 s[6], o[6];
        expand_meta(src, half, s);
        if (offs) expand_meta(src + mb / 2, half, o);
        src += mb;
        int64_t q1 = (k0 + group < k ? k0 + group : k) / 2;
        for (int64_t q = k0 / 2; q < q1; q++, src += pb) {
            bf16 *dst = out + q * PANEL_COLS * 2;
            for (int b = 0; b < 3; b++)
                _mm512_storeu_si512(dst + b * 32, (__m512i)dequant(int4, offs, src, b, s, o));
        }
    }
}

/* gemm_tile over the de-quantized panel (in L2), rows 1..8. prefetch: the part of the next
 * packed panel this tile pulls into L2, `step` bytes a k-pair (NULL: none), so DRAM reads go
 * on while the tiles compute, as thaw_gemm does. */
static inline __attribute__((always_inline)) void bf16_tile(
    const int rows, const bf16 *a, int64_t lda, const bf16 *panel, int64_t pairs,
    const char *prefetch, int64_t step, const float *bias, bf16 *c, int64_t ldc, int64_t cols) {
    __m512 acc[TILE_ROWS][3];
    tile_zero(rows, acc);
    for (int64_t q = 0; q < pairs; q++) {
        const bf16 *wq = panel + q * PANEL_COLS * 2;
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wq);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(wq + 32);
        __m512bh w2 = (__m512bh)_mm512_loadu_si512(wq + 64);
        /* A step is under a line (often a part of one): a line is asked for again, cheaply. */
        if (prefetch)
            for (int64_t off = 0; off < step; off += 64)
                _mm_prefetch(prefetch + q * step + off, _MM_HINT_T1);
        tile_pair(rows, acc, a, lda, q, w0, w1, w2);
    }
    tile_store(rows, acc, bias, c, ldc, cols);
}

/* Row counts as constants, so each tile keeps its accumulators in registers. */
#define THAW_ROWS(CALL)                                                                      \
    switch (rows) {                                                                          \
    case 8: CALL(8); break;                                                                  \
    case 7: CALL(7); break;                                                                  \
    case 6: CALL(6); break;                                                                  \
    case 5: CALL(5); break;                                                                  \
    case 4: CALL(4); break;                                                                  \
    case 3: CALL(3); break;                                                                  \
    case 2: CALL(2); break;                                                                  \
    default: CALL(1); break;                                                                 \
    }

static inline __attribute__((always_inline)) void fused_panel(
    const int int4, const int offs, const bf16 *a, int64_t lda, const uint8_t *panel, int64_t k,
    int64_t group, int half, const float *bias, bf16 *c, int64_t ldc, int64_t rows,
    int64_t cols) {
#define THAW_FUSED(R) fused_tile(R, int4, offs, a, lda, panel, k, group, half, bias, c, ldc, cols)
    THAW_ROWS(THAW_FUSED)
#undef THAW_FUSED
}

/* One instance per (scheme, offsets: 0 none, 1 mul + add, 2 FMA): the branches fold away. */
#define THAW_FUSED_VARIANT(NAME, INT4, OFFS)                                                 \
    static void NAME(const bf16 *a, int64_t lda, const uint8_t *panel, int64_t k,            \
                     int64_t group, int half, const float *bias, bf16 *c, int64_t ldc,       \
                     int64_t rows, int64_t cols) {                                           \
        fused_panel(INT4, OFFS, a, lda, panel, k, group, half, bias, c, ldc, rows, cols);    \
    }
THAW_FUSED_VARIANT(fused_i8, 0, 0)
THAW_FUSED_VARIANT(fused_i8_off, 0, 1)
THAW_FUSED_VARIANT(fused_i4_off, 1, 1)
THAW_FUSED_VARIANT(fused_i4, 1, 0)
THAW_FUSED_VARIANT(fused_i8_fma, 0, 2)
THAW_FUSED_VARIANT(fused_i4_fma, 1, 2)

/* 0: no offsets, 1: q * s + o in two roundings, 2: one FMA (the same value, see dequant). */
static int offset_mode(int flags) {
    return !(flags & Q_OFFSETS) ? 0 : flags & Q_FMA ? 2 : 1;
}

static void dequant_any(int flags, const uint8_t *panel, int64_t k, int64_t group, bf16 *out) {
    int half = !!(flags & Q_HALF), int4 = flags & Q_INT4;
    switch (offset_mode(flags)) {
    case 0:
        if (int4) dequant_panel(1, 0, panel, k, group, half, out);
        else dequant_panel(0, 0, panel, k, group, half, out);
        break;
    case 1:
        if (int4) dequant_panel(1, 1, panel, k, group, half, out);
        else dequant_panel(0, 1, panel, k, group, half, out);
        break;
    default:
        if (int4) dequant_panel(1, 2, panel, k, group, half, out);
        else dequant_panel(0, 2, panel, k, group, half, out);
        break;
    }
}

/* Each OpenMP thread's bf16 panel, grown to the largest k seen. The runtime's threads live as
 * long as the process, so it is allocated once, not per call. */
static _Thread_local bf16 *scratch;
static _Thread_local int64_t scratch_values;

static bf16 *thread_scratch(int64_t values) {
    if (scratch_values < values) {
        free(scratch);
        scratch_values = 0;
        /* 64-byte aligned, size a multiple of 64 bytes (aligned_alloc's rule). */
        scratch = aligned_alloc(64, (size_t)((values * 2 + 63) / 64 * 64));
        if (!scratch) return NULL;
        scratch_values = values;
    }
    return scratch;
}
#endif

/*
 * c [m, n] (row stride ldc) = a [m, k] (row stride lda) . W^T + bias, W packed by
 * thaw_qgemm_pack with these k, group and flags. bias: float32 [n] or NULL.
 * Returns 0; -1 when this build has no kernel; -2 when a thread's scratch could not be allocated.
 * Threads split the panels.
 */
int thaw_qgemm(const bf16 *a, int64_t lda, const uint8_t *packed, const float *bias, bf16 *c,
               int64_t ldc, int64_t m, int64_t n, int64_t k, int64_t group, int flags) {
#ifdef THAW_QGEMM
    int64_t panels = (n + PANEL_COLS - 1) / PANEL_COLS, pbytes = panel_bytes(k, group, flags);
    int half = !!(flags & Q_HALF), failed = 0;
    /* The scratch path's prefetch: each of the tiles pulls its share of the next panel, `step`
     * bytes per k-pair (each tile's share is step * pairs bytes). */
    int64_t tiles = (m + TILE_ROWS - 1) / TILE_ROWS;
    int64_t step = (pbytes + tiles * (k / 2) - 1) / (tiles * (k / 2));
    void (*fused)(const bf16 *, int64_t, const uint8_t *, int64_t, int64_t, int, const float *,
                  bf16 *, int64_t, int64_t, int64_t);
    switch (offset_mode(flags)) {
    case 0: fused = flags & Q_INT4 ? fused_i4 : fused_i8; break;
    case 1: fused = flags & Q_INT4 ? fused_i4_off : fused_i8_off; break;
    default: fused = flags & Q_INT4 ? fused_i4_fma : fused_i8_fma; break;
    }
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const uint8_t *panel = packed + p * pbytes;
        int64_t cols = n - p * PANEL_COLS < PANEL_COLS ? n - p * PANEL_COLS : PANEL_COLS;
        const float *panel_bias = bias ? bias + p * PANEL_COLS : NULL;
        if (m <= TILE_ROWS) {
            fused(a, lda, panel, k, group, half, panel_bias, c + p * PANEL_COLS, ldc, m, cols);
            continue;
        }
        bf16 *w = thread_scratch(k * PANEL_COLS);
        if (!w) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        dequant_any(flags, panel, k, group, w);
        for (int64_t m0 = 0, t = 0; m0 < m; m0 += TILE_ROWS, t++) {
            int64_t rows = m - m0 < TILE_ROWS ? m - m0 : TILE_ROWS;
            const bf16 *at = a + m0 * lda;
            bf16 *ct = c + m0 * ldc + p * PANEL_COLS;
            const char *prefetch = NULL;
            if (p + 1 < panels) prefetch = (const char *)panel + pbytes + t * step * (k / 2);
#define THAW_TILE(R) bf16_tile(R, at, lda, w, k / 2, prefetch, step, panel_bias, ct, ldc, cols)
            THAW_ROWS(THAW_TILE)
#undef THAW_TILE
        }
    }
    return failed ? -2 : 0;
#else
    (void)a, (void)lda, (void)packed, (void)bias, (void)c, (void)ldc, (void)m, (void)n, (void)k;
    (void)group, (void)flags;
    return -1;
#endif
}
