/* passes.h -- compiles a file's pointwise passes once per code path.
 *
 * Inside a dtype-generic part (instantiate.h), a file defines RF_PASSES_FILE as its own
 * name and includes this header, which includes the file back with RF_PASS defined: once
 * for AVX2 and FMA (RF_PASS_AVX2 1, names suffixed _v3) where the build has that
 * code, once for the baseline (RF_PASS_AVX2 0, _base). The part of the file under
 * #ifdef RF_PASS is written once, its functions named RF_PASS(name) and marked
 * RF_PASS_TARGET; callers take the copy their rf_runtime picks: RF_PICK(name, rt->avx2).
 * The two copies' loops round alike (-ffp-contract=off: no fused a*b+c); the v3 copy is
 * the faster, and with float it also takes the one-pass AVX2 code and the vector
 * activations, whose bits differ from libm's. SIGMOID(a, n) and TANH(a, n) apply the
 * copy's activations in place. */
#define SIGMOID(a, n) RF_FN(rf_sigmoid)(a, n, RF_PASS_AVX2)
#define TANH(a, n) RF_FN(rf_tanh)(a, n, RF_PASS_AVX2)
#if RF_HAVE_AVX2
#define RF_PASS(name) RF_CAT(RF_FN(name), v3)
/* exactly the features rf_cpu_avx2 checks: a whole x86-64-v3 target would let the
 * compiler use BMI2 and others too, which some CPUs with AVX2 and FMA lack */
#define RF_PASS_TARGET __attribute__((target("avx2,fma")))
#define RF_PASS_AVX2 1
#include RF_PASSES_FILE
#undef RF_PASS
#undef RF_PASS_TARGET
#undef RF_PASS_AVX2
#endif

#define RF_PASS(name) RF_CAT(RF_FN(name), base)
#define RF_PASS_TARGET
#define RF_PASS_AVX2 0
#include RF_PASSES_FILE
#undef RF_PASS
#undef RF_PASS_TARGET
#undef RF_PASS_AVX2
#undef RF_PASSES_FILE
#undef SIGMOID
#undef TANH
