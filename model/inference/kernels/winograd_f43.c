/* Winograd F(4x4, 3x3) convolution (model/inference/winograd.py has the method and the matrices).
 *
 * Plain C: built at first use with the system's C compiler (`cc -O3 -march=native -fopenmp`), called through
 * ctypes. One call does a whole convolution, a block of tiles at a time: the block's input transform, its 36
 * products (a small register-blocked GEMM each, against the kernel packed once at load), its output transform
 * (plus the bias and the activation). A block's transformed input and products (about 0.5 MB) stay in the core's
 * L2 cache between the three steps, instead of a round trip to memory for each. The GEMM, written for these
 * shapes, ran at 83 GFLOP/s inside this kernel on one Zen 4 core (105-115 alone on a block's shapes), where the BLAS
 * that torch.bmm calls (MKL, which takes its AVX2 path on AMD CPUs) ran at 56-76 (2026-12-07, /tmp
 * micro-benchmarks). It needs the compiler to fuse multiply-adds (`-ffp-contract=fast`: winograd.py).
 *
 * Blocks are cut over `nthreads` OpenMP threads (the caller passes torch's count): the library's libgomp.so.1 is
 * the one torch already loaded (same soname), so these regions use torch's own thread pool and wait policy, never a
 * second one. Built without OpenMP the pragmas are ignored and one thread does all blocks.
 *
 * Layouts, all float32, row-major, contiguous:
 *   x     (n, h, w, c)        the NHWC input; the convolution's zero padding (1, and at the far edges up to whole
 *                             tiles: th = ceil(h / 4), tw = ceil(w / 4)) is read as zeros, never stored
 *   u     (36, kp/NR, c, NR)  the transformed kernel G g G^T, element-major, packed in panels of NR output
 *                             channels (kp: k rounded up to NR, the padding zeros)
 *   y     (n, h, w, k)        the NHWC output, cropped to h x w, bias added, then the activation (`act`: 0 none,
 *                             1 SiLU), so that the following SiLU costs no pass of its own over memory
 * Within a block of tb tiles: v (36, tb, c) and m (36, tb, kp), each element's rows one tile's.
 * Channels go 16 at a time in the transforms: the innermost loops are 16 lanes wide, which the compiler turns into
 * one AVX-512 register (or two AVX2 ones).
 */
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define A_ELEMENTS 36 /* 6 x 6 */

#define ACT_NONE 0
#define ACT_SILU 1

/* e^z for z clamped to [-87, 87], in operations the compiler vectorises over the 16 lanes (no libm call, no
 * branch): z = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, so that r keeps its low bits), e^r by its Taylor
 * series to r^6, 2^n written into the exponent bits. n is rounded by adding 1.5 * 2^23, which leaves n in the
 * sum's low mantissa bits. Worst relative error of the SiLU below from -120 to 120: 2.6e-7 against double,
 * with and without FMA contraction. */
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

/* The GEMM's register block: MR tiles x NR output channels, 12 vector accumulators with AVX-512. */
#define MR 6
#define NR 32
/* A block's v and m together take about this many bytes (half a Zen 4 core's L2). */
#define BLOCK_BYTES (512 * 1024)

/* mc[rows x NR] (row stride ldm) = va[rows x c] (row stride c) . up[c x NR] (one packed panel), rows <= MR */
static inline __attribute__((always_inline)) void gemm_micro(const float *restrict va, const float *restrict up,
                                                             long c, float *restrict mc, long ldm, int rows) {
    float acc[MR][NR];
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < NR; ++j) acc[r][j] = 0.0f;
    for (long q = 0; q < c; ++q) {
        const float *b = up + q * NR;
        for (int r = 0; r < rows; ++r) {
            const float a = va[r * c + q];
            for (int j = 0; j < NR; ++j) acc[r][j] += a * b[j];
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < NR; ++j) mc[r * ldm + j] = acc[r][j];
}

/* gemm_micro with `rows` a constant in each inlined copy: a short group of tiles (a block's last, or a small
 * map's) costs its own rows' multiply-adds, not MR's. */
static inline __attribute__((always_inline)) void gemm_rows(const float *restrict va, const float *restrict up,
                                                            long c, float *restrict mc, long ldm, int rows) {
    switch (rows) {
    case 1: gemm_micro(va, up, c, mc, ldm, 1); break;
    case 2: gemm_micro(va, up, c, mc, ldm, 2); break;
    case 3: gemm_micro(va, up, c, mc, ldm, 3); break;
    case 4: gemm_micro(va, up, c, mc, ldm, 4); break;
    case 5: gemm_micro(va, up, c, mc, ldm, 5); break;
    default: gemm_micro(va, up, c, mc, ldm, MR); break;
    }
}

/* One block of tiles [t0, t0 + tb): transform in, 36 products, transform out. */
static inline __attribute__((always_inline)) void conv_block(const float *x, const float *u, const float *bias,
                                                             float *y, long h, long w, long c, long k, long kp,
                                                             long th, long tw, long t0, long tb, float *v,
                                                             float *m, long act) {
    for (long t = 0; t < tb; ++t) {
        long img, i, j;
        tile_position(t0 + t, th, tw, &img, &i, &j);
        const float *base = x + img * h * w * c;
        /* tile (i, j) reads input rows 4i-1 .. 4i+4 and columns 4j-1 .. 4j+4 (padding 1) */
        long c0 = 0;
        for (; c0 + LANES <= c; c0 += LANES)
            input_block(base + c0, h, w, c, i * 4 - 1, j * 4 - 1, v + t * c + c0, tb * c, LANES);
        if (c0 < c) input_block(base + c0, h, w, c, i * 4 - 1, j * 4 - 1, v + t * c + c0, tb * c, c - c0);
    }
    for (long e = 0; e < A_ELEMENTS; ++e)
        for (long n0 = 0; n0 < kp; n0 += NR)
            for (long r0 = 0; r0 < tb; r0 += MR)
                gemm_rows(v + (e * tb + r0) * c, u + (e * kp + n0) * c, c, m + (e * tb + r0) * kp + n0, kp,
                          tb - r0 < MR ? (int)(tb - r0) : MR);
    for (long t = 0; t < tb; ++t) {
        long img, i, j;
        tile_position(t0 + t, th, tw, &img, &i, &j);
        const long rows = h - i * 4 < 4 ? h - i * 4 : 4, cols = w - j * 4 < 4 ? w - j * 4 : 4;
        float *dst = y + ((img * h + i * 4) * w + j * 4) * k;
        long k0 = 0;
        for (; k0 + LANES <= k; k0 += LANES)
            output_block(m + t * kp + k0, tb * kp, bias + k0, dst + k0, w, k, rows, cols, LANES, act);
        if (k0 < k) output_block(m + t * kp + k0, tb * kp, bias + k0, dst + k0, w, k, rows, cols, k - k0, act);
    }
}

/* Tiles per block: a multiple of MR whose v and m fit BLOCK_BYTES, at least MR; with several threads also at
 * most a quarter of one thread's share, so that a small map (a 20x20 map is 25 tiles) still makes several blocks
 * per thread for the dynamic schedule to even out. With whole L2-sized blocks only, 96 -> 96 at 20x20 made two
 * blocks of 18 and 7 tiles and 192 -> 192 at 20x20 five (three on one thread, two on the other). */
static long block_tiles(long c, long kp, long tiles, long nthreads) {
    long tb = BLOCK_BYTES / ((long)sizeof(float) * A_ELEMENTS * (c + kp)) / MR * MR;
    if (nthreads > 1) {
        const long quarter = tiles / (4 * nthreads) / MR * MR;
        if (quarter < tb) tb = quarter;
    }
    return tb < MR ? MR : tb;
}

/* Every block; inlined once per activation, so that `act` is a constant inside the loops. Returns 0, or -1 when
 * a thread could not allocate its block's scratch (y is then incomplete; the caller raises). */
static inline __attribute__((always_inline)) long conv_all(const float *x, const float *u, const float *bias,
                                                           float *y, long n, long h, long w, long c, long k,
                                                           long th, long tw, long act, long nthreads) {
    const long kp = (k + NR - 1) / NR * NR, tiles = n * th * tw, tb = block_tiles(c, kp, tiles, nthreads);
    const long blocks = (tiles + tb - 1) / tb;
    long failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && blocks > 1) reduction(| : failed)
    {
        /* Each thread's own scratch: malloc'd per call (glibc serves it from its heap after the first). Every
         * thread still meets the `omp for` below (a worksharing loop must be met by all of a team or none). */
        float *v = malloc(sizeof(float) * A_ELEMENTS * tb * (c + kp));
        float *m = v == NULL ? NULL : v + A_ELEMENTS * tb * c;
        if (v == NULL) failed = 1;
        /* dynamic: a thread that starts late (with OMP_WAIT_POLICY=PASSIVE the second one is woken from sleep
         * first) or runs slower (a busy neighbour on its core) takes fewer blocks instead of holding the other
         * at the closing barrier. */
#pragma omp for schedule(dynamic, 1)
        for (long blk = 0; blk < blocks; ++blk) {
            const long t0 = blk * tb, count = tiles - t0 < tb ? tiles - t0 : tb;
            if (v != NULL) conv_block(x, u, bias, y, h, w, c, k, kp, th, tw, t0, count, v, m, act);
        }
        free(v);
    }
    return failed ? -1 : 0;
}

long winograd_conv(const float *x, const float *u, const float *bias, float *y, long n, long h, long w, long c,
                   long k, long th, long tw, long act, long nthreads) {
    if (act == ACT_SILU)
        return conv_all(x, u, bias, y, n, h, w, c, k, th, tw, ACT_SILU, nthreads);
    return conv_all(x, u, bias, y, n, h, w, c, k, th, tw, ACT_NONE, nthreads);
}
