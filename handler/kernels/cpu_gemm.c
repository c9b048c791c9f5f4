/*
 * bfloat16 matrix multiply for the linear layers: C[m, n] = A[m, k] . W[n, k]^T (+ bias),
 * float32 accumulation, one rounding to bf16 per output. handler/kernels/cpu.py binds it and
 * handler/model/linear.py uses it for every linear layer of the bf16 CPU path.
 *
 * Why our own: decode steps multiply few rows (one per running sequence) by weights that do not
 * fit in cache, and oneDNN's kernels are tuned for large batches. This one keeps every weight
 * byte's use close to its load: the weight is packed once into panels of 48 output columns,
 * k-pairs interleaved as VDPBF16PS reads them, so a panel streams from memory in order and stays
 * in L2 while every 8-row tile of A passes over it. While one panel computes, the next is
 * prefetched into L2, which keeps DRAM reads steady instead of bursting at each panel's first
 * tile.
 *
 * Packed layout: [ceil(n / 48) panels][k / 2 pairs][48 columns][2] bf16, columns past n zero.
 * k must be even (every supported model's is; odd k stays on oneDNN).
 */
#include <stdint.h>
#include <string.h>

#include "cpu_gemm_tile.h"
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define THAW_GEMM 1
#endif

/* 1 when this build has the kernel (it needs AVX-512 BF16), else 0 and thaw_gemm refuses. */
int thaw_gemm_available(void) {
#ifdef THAW_GEMM
    return 1;
#else
    return 0;
#endif
}

/* Values a packed weight of [n, k] holds (its allocation size, in bf16). */
int64_t thaw_gemm_packed_size(int64_t n, int64_t k) {
    return (n + PANEL_COLS - 1) / PANEL_COLS * PANEL_COLS * k;
}

/* w [n, k] row-major -> out, the packed layout above. Rows are read in order, pairs scattered. */
void thaw_gemm_pack(const bf16 *w, int64_t n, int64_t k, bf16 *out) {
    int64_t panels = (n + PANEL_COLS - 1) / PANEL_COLS, pairs = k / 2;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        uint32_t *dst = (uint32_t *)(out + p * pairs * PANEL_COLS * 2);
        for (int64_t j = 0; j < PANEL_COLS; j++) {
            int64_t col = p * PANEL_COLS + j;
            if (col >= n) {
                for (int64_t q = 0; q < pairs; q++) dst[q * PANEL_COLS + j] = 0;
                continue;
            }
            const bf16 *row = w + col * k;
            for (int64_t q = 0; q < pairs; q++) {
                uint32_t pair;
                memcpy(&pair, row + 2 * q, sizeof pair);
                dst[q * PANEL_COLS + j] = pair;
            }
        }
    }
}

#ifdef THAW_GEMM
/*
 * One tile: `rows` (1..8, a constant after inlining) rows of A times one panel, 48 columns.
 * 24 float32 accumulators + 3 weight registers fit AVX-512's 32. Each step of the k loop loads
 * a pair of k values of 48 columns (3 x 64 bytes) and multiplies it into every row.
 * prefetch: where in the next panel this step should pull a line into L2 (NULL: none).
 */
static inline __attribute__((always_inline)) void gemm_tile(
    const int rows, const bf16 *a, int64_t lda, const bf16 *panel, int64_t pairs,
    const char *prefetch, int64_t prefetch_step, int prefetch_two, const float *bias, bf16 *c,
    int64_t ldc, int64_t cols) {
    __m512 acc[TILE_ROWS][3];
    tile_zero(rows, acc);
    for (int64_t q = 0; q < pairs; q++) {
        const bf16 *wq = panel + q * PANEL_COLS * 2;
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wq);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(wq + 32);
        __m512bh w2 = (__m512bh)_mm512_loadu_si512(wq + 64);
        if (prefetch) {
            const char *line = prefetch + q * prefetch_step;
            _mm_prefetch(line, _MM_HINT_T1);
            if (prefetch_two) _mm_prefetch(line + 64, _MM_HINT_T1);
        }
        tile_pair(rows, acc, a, lda, q, w0, w1, w2);
    }
    tile_store(rows, acc, bias, c, ldc, cols);
}
#endif

/*
 * c [m, n] (row stride ldc) = a [m, k] (row stride lda) . unpacked(packed)^T + bias.
 * bias: float32 [n] or NULL. Returns 0, or -1 when this build has no kernel.
 * Threads split the panels; each thread runs all row tiles of its panels.
 */
int thaw_gemm(const bf16 *a, int64_t lda, const bf16 *packed, const float *bias, bf16 *c,
              int64_t ldc, int64_t m, int64_t n, int64_t k) {
#ifdef THAW_GEMM
    int64_t panels = (n + PANEL_COLS - 1) / PANEL_COLS, pairs = k / 2;
    int64_t tiles = (m + TILE_ROWS - 1) / TILE_ROWS;
    int64_t panel_values = pairs * PANEL_COLS * 2, panel_bytes = panel_values * 2;
    /* Spread the next panel's lines over this panel's tiles: a step of the k loop covers
     * 192 / tiles bytes of it. One tile streams once; the hardware prefetcher does that. */
    int64_t prefetch_step = tiles > 1 ? PANEL_COLS * 4 / tiles : 0;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const bf16 *panel = packed + p * panel_values;
        int64_t cols = n - p * PANEL_COLS < PANEL_COLS ? n - p * PANEL_COLS : PANEL_COLS;
        const float *panel_bias = bias ? bias + p * PANEL_COLS : NULL;
        for (int64_t t = 0; t < tiles; t++) {
            int64_t m0 = t * TILE_ROWS, rows = m - m0 < TILE_ROWS ? m - m0 : TILE_ROWS;
            const char *prefetch = NULL;
            if (prefetch_step && p + 1 < panels)
                prefetch = (const char *)(panel + panel_values) + t * (panel_bytes / tiles);
            const bf16 *at = a + m0 * lda;
            bf16 *ct = c + m0 * ldc + p * PANEL_COLS;
            int two = tiles == 2;
#define THAW_TILE(R)                                                                         \
    gemm_tile(R, at, lda, panel, pairs, prefetch, prefetch_step, two, panel_bias, ct, ldc, cols)
            switch (rows) {
            case 8: THAW_TILE(8); break;
            case 7: THAW_TILE(7); break;
            case 6: THAW_TILE(6); break;
            case 5: THAW_TILE(5); break;
            case 4: THAW_TILE(4); break;
            case 3: THAW_TILE(3); break;
            case 2: THAW_TILE(2); break;
            default: THAW_TILE(1); break;
            }
#undef THAW_TILE
        }
    }
    return 0;
#else
    (void)a, (void)lda, (void)packed, (void)bias, (void)c, (void)ldc, (void)m, (void)n, (void)k;
    return -1;
#endif
}
