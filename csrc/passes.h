/* passes.h -- compiles a file's pointwise passes once per code path.
 *
 * Inside a dtype-generic part (instantiate.h), a file defines RF_PASSES_FILE as its own
 * name and includes this header, which includes the file back with RF_PASS defined: where
 * the build has vector code, once for AVX-512F (names suffixed _avx512) and once for AVX2
 * and FMA (_v3), both with RF_PASS_AVX2 1 and RF_PASS_VW their vector width (16, 8);
 * once for the baseline (RF_PASS_AVX2 0, _base); RF_PASS_SIMD is each copy's RF_SIMD_*. The part of the file under #ifdef RF_PASS
 * is written once, its functions named RF_PASS(name) and marked RF_PASS_TARGET; callers
 * take the copy their rf_runtime picks: RF_PICK(name, rf_simd(rt)). The copies' loops
 * round alike (-ffp-contract=off: no fused a*b+c); the vector copies are the faster, and
 * with float they also take the one-pass code of their width (widths.h) and the vector
 * activations, whose bits differ from libm's. SIGMOID(a, n) and TANH(a, n) apply the
 * copy's activations in place. */
#define SIGMOID(a, n) RF_FN(rf_sigmoid)(a, n, RF_PASS_SIMD)
#define TANH(a, n) RF_FN(rf_tanh)(a, n, RF_PASS_SIMD)
#if RF_HAVE_AVX2
#define RF_PASS(name) RF_CAT(RF_FN(name), avx512)
#define RF_PASS_TARGET __attribute__((target("avx512f,avx2,fma")))
#define RF_PASS_AVX2 1
#define RF_PASS_VW 16
#define RF_PASS_SIMD RF_SIMD_AVX512
#include RF_PASSES_FILE
#undef RF_PASS
#undef RF_PASS_TARGET
#undef RF_PASS_AVX2
#undef RF_PASS_VW
#undef RF_PASS_SIMD

#define RF_PASS(name) RF_CAT(RF_FN(name), v3)
/* exactly the features rf_cpu_avx2 checks: a whole x86-64-v3 target would let the
 * compiler use BMI2 and others too, which some CPUs with AVX2 and FMA lack */
#define RF_PASS_TARGET __attribute__((target("avx2,fma")))
#define RF_PASS_AVX2 1
#define RF_PASS_VW 8
#define RF_PASS_SIMD RF_SIMD_AVX2
#include RF_PASSES_FILE
#undef RF_PASS
#undef RF_PASS_TARGET
#undef RF_PASS_AVX2
#undef RF_PASS_VW
#undef RF_PASS_SIMD
#endif

#define RF_PASS(name) RF_CAT(RF_FN(name), base)
#define RF_PASS_TARGET
#define RF_PASS_AVX2 0
#define RF_PASS_SIMD RF_SIMD_PORTABLE
#include RF_PASSES_FILE
#undef RF_PASS
#undef RF_PASS_TARGET
#undef RF_PASS_AVX2
#undef RF_PASS_SIMD
#undef RF_PASSES_FILE
#undef SIGMOID
#undef TANH
