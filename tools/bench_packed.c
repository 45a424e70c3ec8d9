/* bench_packed.c -- GFLOP/s of the own product (csrc/packed.c) alone, at one shape, without
 * Python or the cells around it: C (M,N) += A (M,K) op(W), W (N,K) packed as W^T, as the
 * forwards do. Best of 7 runs of reps calls each (the machine is shared: compare variants
 * by alternating runs, not by one number).
 *
 *   gcc -O3 -std=c11 -Icsrc tools/bench_packed.c -o /tmp/bench_packed
 *   /tmp/bench_packed M N K [reps] [step] [simd]   e.g. 16 512 128 (an LSTM step: B=16,
 *                                                  H=128) or 1600 512 64 1000 0 (its projection)
 * step: 1 (the default: a step's product, panels outer), 0 (a projection, row tiles
 * outer). simd: 0 the portable tile, 1 AVX2+FMA, 2 AVX-512F (default: the best this CPU
 * runs). float32. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "packed.c"

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static float *buffer(ptrdiff_t n, float scale) {  /* cache-line aligned, as rnnfuse's are */
    float *a = aligned_alloc(64, (size_t)((n * (ptrdiff_t)sizeof(float) + 63) / 64 * 64));
    if (!a) { perror("aligned_alloc"); exit(1); }
    for (ptrdiff_t i = 0; i < n; i++) a[i] = scale * (float)(i % 7 - 3);
    return a;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s M N K [reps] [step] [simd]\n", argv[0]);
        return 2;
    }
    ptrdiff_t M = atol(argv[1]), N = atol(argv[2]), K = atol(argv[3]);
    long reps = argc > 4 ? atol(argv[4]) : 0;
    int step = argc > 5 ? atoi(argv[5]) : 1;
    if (M < 1 || N < 1 || K < 1) {
        fprintf(stderr, "M, N and K must be positive\n");
        return 2;
    }
    double flops = 2.0 * (double)M * (double)N * (double)K;
    if (reps < 1) reps = (long)(2e8 / flops) + 1;  /* about 2 ms a run at 100 GFLOP/s */
    float *A = buffer(M * K, 0.1f), *W = buffer(N * K, 0.01f), *C = buffer(M * N, 0.0f);
    float *packed = buffer(rf_packed_size(K, N), 0.0f);
    int best_simd = rf_cpu_avx512() ? RF_SIMD_AVX512 : rf_cpu_avx2() ? RF_SIMD_AVX2 : 0;
    int simd = argc > 6 ? atoi(argv[6]) : best_simd;
    if (simd < 0 || simd > best_simd) {
        fprintf(stderr, "simd must be 0 (portable) .. %d (the best this CPU runs)\n", best_simd);
        return 2;
    }
    rf_pack_f32(packed, W, K, 1, K, N, simd > 0);
    double best = 1e30;
    for (int run = 0; run < 7; run++) {
        double t = seconds();
        for (long r = 0; r < reps; r++)
            rf_packed_gemm_f32(M, N, K, A, K, packed, RF_PANEL_BYTES / (ptrdiff_t)sizeof(float) * K,
                               1, C, N, step, simd);
        t = seconds() - t;
        if (t < best) best = t;
    }
    printf("M=%td N=%td K=%td step=%d %s: %.1f GFLOP/s (%.3f us a call)\n", M, N, K,
           step, (const char *[]){"portable", "avx2", "avx512"}[simd],
           flops * (double)reps / best * 1e-9,
           best / (double)reps * 1e6);
    return 0;
}
