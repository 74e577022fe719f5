/* Winograd F(4x4, 3x3) transforms (model/inference/winograd.py has the method and the matrices).
 *
 * Plain C: built at first use with the system's C compiler (`cc -O3 -march=native -fopenmp`), called through
 * ctypes. The batched GEMM between the two transforms stays torch's. The tiles are cut over `nthreads` OpenMP
 * threads (the caller passes torch's count): the library's libgomp.so.1 is the one torch already loaded (same
 * soname), so these regions use torch's own thread pool and wait policy, never a second one. Built without
 * OpenMP the pragmas are ignored and one thread does all tiles.
 *
 * Layouts, all float32, row-major, contiguous:
 *   x     (n, h, w, c)       the NHWC input; the convolution's zero padding (1, and at the far edges up to whole
 *                            tiles: th = ceil(h / 4), tw = ceil(w / 4)) is read as zeros, never stored
 *   v     (36, tiles, c)     each tile's transformed 6x6 block, element-major; tiles = n * th * tw
 *   prod  (36, tiles, k)     the products in the transform space
 *   y     (n, h, w, k)       the NHWC output, cropped to h x w, bias added, then the activation (`act`: 0 none,
 *                            1 SiLU), so that the following SiLU costs no pass of its own over memory
 * Channels go 16 at a time: the innermost loops are 16 lanes wide, which
 * the compiler turns into one AVX-512 register (or two AVX2 ones).
 */
#include <string.h>

#define LANES 16

/* Below this many (tile, channel) pairs one thread does all: waking a second one (PASSIVE wait policy) costs more
 * than it saves. Measured on the 2-core VM: 400 tiles x 96 channels (80x80) 0.59 -> 0.37 ms on two threads,
 * 100 x 96 (40x40) 0.12 -> 0.15 ms. */
#define MIN_PARALLEL_WORK 32768

#define ACT_NONE 0
#define ACT_SILU 1

/* e^z for z clamped to [-87, 87], in operations the compiler vectorises over the 16 lanes (no libm call, no
 * branch): z = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, so that r keeps its low bits), e^r by its Taylor
 * series to r^6, 2^n written into the exponent bits. n is rounded by adding 1.5 * 2^23, which leaves n in the
 * sum's low mantissa bits. Worst relative error of the SiLU below from -120 to 120: 2.6e-7 (against double). */
static inline float exp_lanes(float z) {
    z = z > 87.0f ? 87.0f : z;
    z = z < -87.0f ? -87.0f : z;
    const float shifted = z * 1.44269504f + 12582912.0f;
    const float n = shifted - 12582912.0f;
    const float r = (z - n * 0.693359375f) - n * -2.12194440e-4f;
    const float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666667e-1f + r * (4.16666667e-2f
                    + r * (8.33333333e-3f + r * 1.38888889e-3f)))));
    int bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4B400000 + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* x * sigmoid(x) */
static inline float silu(float x) { return x / (1.0f + exp_lanes(-x)); }

static inline void tile_position(long t, long th, long tw, long *img, long *i, long *j) {
    *img = t / (th * tw);
    long rem = t % (th * tw);
    *i = rem / tw;
    *j = rem % tw;
}

/* One tile's 16 (or, at the end, cn) channels: load the 6x6 block, B^T d B, store element-major. Inlined with
 * cn == LANES for whole blocks, so that every loop below is a fixed 16 lanes wide. */
static inline __attribute__((always_inline)) void input_block(const float *img, long h, long w, long c, long top,
                                                              long left, float *v, long stride36, long cn) {
    float d[6][6][LANES], r[6][6][LANES];
    for (int a = 0; a < 6; ++a)
        for (int b = 0; b < 6; ++b) {
            const long row = top + a, col = left + b;
            if (row < 0 || row >= h || col < 0 || col >= w) { /* the convolution's zero padding */
                for (long l = 0; l < LANES; ++l) d[a][b][l] = 0.0f;
                continue;
            }
            const float *src = img + (row * w + col) * c;
            for (long l = 0; l < LANES; ++l) d[a][b][l] = l < cn ? src[l] : 0.0f;
        }
    /* rows: r = B^T d */
    for (int b = 0; b < 6; ++b)
        for (long l = 0; l < LANES; ++l) {
            const float d0 = d[0][b][l], d1 = d[1][b][l], d2 = d[2][b][l];
            const float d3 = d[3][b][l], d4 = d[4][b][l], d5 = d[5][b][l];
            r[0][b][l] = 4.0f * d0 - 5.0f * d2 + d4;
            r[1][b][l] = -4.0f * d1 - 4.0f * d2 + d3 + d4;
            r[2][b][l] = 4.0f * d1 - 4.0f * d2 - d3 + d4;
            r[3][b][l] = -2.0f * d1 - d2 + 2.0f * d3 + d4;
            r[4][b][l] = 2.0f * d1 - d2 - 2.0f * d3 + d4;
            r[5][b][l] = 4.0f * d1 - 5.0f * d3 + d5;
        }
    /* columns: (B^T d) B, stored element-major (stride36 floats from one element's row to the next) */
    for (int a = 0; a < 6; ++a) {
        float out[6][LANES];
        for (long l = 0; l < LANES; ++l) {
            const float e0 = r[a][0][l], e1 = r[a][1][l], e2 = r[a][2][l];
            const float e3 = r[a][3][l], e4 = r[a][4][l], e5 = r[a][5][l];
            out[0][l] = 4.0f * e0 - 5.0f * e2 + e4;
            out[1][l] = -4.0f * e1 - 4.0f * e2 + e3 + e4;
            out[2][l] = 4.0f * e1 - 4.0f * e2 - e3 + e4;
            out[3][l] = -2.0f * e1 - e2 + 2.0f * e3 + e4;
            out[4][l] = 2.0f * e1 - e2 - 2.0f * e3 + e4;
            out[5][l] = 4.0f * e1 - 5.0f * e3 + e5;
        }
        for (int b = 0; b < 6; ++b) {
            float *dst = v + (long)(a * 6 + b) * stride36;
            for (long l = 0; l < LANES; ++l)
                if (l < cn) dst[l] = out[b][l];
        }
    }
}

void winograd_input(const float *x, float *v, long n, long h, long w, long c, long th, long tw, long nthreads) {
    const long tiles = n * th * tw;
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && tiles * c >= MIN_PARALLEL_WORK)
    for (long t = 0; t < tiles; ++t) {
        long img, i, j;
        tile_position(t, th, tw, &img, &i, &j);
        const float *base = x + img * h * w * c;
        /* tile (i, j) reads input rows 4i-1 .. 4i+4 and columns 4j-1 .. 4j+4 (padding 1) */
        long c0 = 0;
        for (; c0 + LANES <= c; c0 += LANES)
            input_block(base + c0, h, w, c, i * 4 - 1, j * 4 - 1, v + t * c + c0, tiles * c, LANES);
        if (c0 < c) input_block(base + c0, h, w, c, i * 4 - 1, j * 4 - 1, v + t * c + c0, tiles * c, c - c0);
    }
}

/* One tile's 16 (or cn) output channels: load the 6x6 products, A^T m A plus the bias, store what falls
 * inside h x w. */
static inline __attribute__((always_inline)) void output_block(const float *prod, long stride36,
                                                               const float *bias, float *y, long w, long k,
                                                               long rows, long cols, long cn, long act) {
    float m[6][6][LANES], r[4][6][LANES], bk[LANES];
    for (int a = 0; a < 6; ++a)
        for (int b = 0; b < 6; ++b) {
            const float *src = prod + (long)(a * 6 + b) * stride36;
            for (long l = 0; l < LANES; ++l) m[a][b][l] = l < cn ? src[l] : 0.0f;
        }
    for (long l = 0; l < LANES; ++l) bk[l] = l < cn ? bias[l] : 0.0f;
    /* rows: r = A^T m */
    for (int b = 0; b < 6; ++b)
        for (long l = 0; l < LANES; ++l) {
            const float m0 = m[0][b][l], m1 = m[1][b][l], m2 = m[2][b][l];
            const float m3 = m[3][b][l], m4 = m[4][b][l], m5 = m[5][b][l];
            r[0][b][l] = m0 + m1 + m2 + m3 + m4;
            r[1][b][l] = m1 - m2 + 2.0f * m3 - 2.0f * m4;
            r[2][b][l] = m1 + m2 + 4.0f * m3 + 4.0f * m4;
            r[3][b][l] = m1 - m2 + 8.0f * m3 - 8.0f * m4 + m5;
        }
    /* columns: (A^T m) A, plus the bias */
    for (int p = 0; p < rows; ++p) {
        float out[4][LANES];
        for (long l = 0; l < LANES; ++l) {
            const float e0 = r[p][0][l], e1 = r[p][1][l], e2 = r[p][2][l];
            const float e3 = r[p][3][l], e4 = r[p][4][l], e5 = r[p][5][l];
            out[0][l] = e0 + e1 + e2 + e3 + e4 + bk[l];
            out[1][l] = e1 - e2 + 2.0f * e3 - 2.0f * e4 + bk[l];
            out[2][l] = e1 + e2 + 4.0f * e3 + 4.0f * e4 + bk[l];
            out[3][l] = e1 - e2 + 8.0f * e3 - 8.0f * e4 + e5 + bk[l];
        }
        if (act == ACT_SILU)
            for (int q = 0; q < 4; ++q)
                for (long l = 0; l < LANES; ++l) out[q][l] = silu(out[q][l]);
        for (int q = 0; q < cols; ++q) {
            float *dst = y + (p * w + q) * k;
            for (long l = 0; l < LANES; ++l)
                if (l < cn) dst[l] = out[q][l];
        }
    }
}

/* All tiles; inlined once per activation, so that `act` is a constant inside the loops. */
static inline __attribute__((always_inline)) void output_tiles(const float *prod, const float *bias, float *y,
                                                               long n, long h, long w, long k, long th, long tw,
                                                               long act, long nthreads) {
    const long tiles = n * th * tw;
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && tiles * k >= MIN_PARALLEL_WORK)
    for (long t = 0; t < tiles; ++t) {
        long img, i, j;
        tile_position(t, th, tw, &img, &i, &j);
        const long rows = h - i * 4 < 4 ? h - i * 4 : 4, cols = w - j * 4 < 4 ? w - j * 4 : 4;
        float *dst = y + ((img * h + i * 4) * w + j * 4) * k;
        long k0 = 0;
        for (; k0 + LANES <= k; k0 += LANES)
            output_block(prod + t * k + k0, tiles * k, bias + k0, dst + k0, w, k, rows, cols, LANES, act);
        if (k0 < k) output_block(prod + t * k + k0, tiles * k, bias + k0, dst + k0, w, k, rows, cols, k - k0, act);
    }
}

void winograd_output(const float *prod, const float *bias, float *y, long n, long h, long w, long k, long th,
                     long tw, long act, long nthreads) {
    if (act == ACT_SILU)
        output_tiles(prod, bias, y, n, h, w, k, th, tw, ACT_SILU, nthreads);
    else
        output_tiles(prod, bias, y, n, h, w, k, th, tw, ACT_NONE, nthreads);
}
