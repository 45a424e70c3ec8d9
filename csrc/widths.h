/* widths.h -- compiles a file's one-pass float code once per vector width.
 *
 * Inside a dtype-generic part (instantiate.h), a file defines RF_WIDTHS_FILE as its own
 * name and includes this header, which, for float where the build has vector code,
 * includes the file back with RF_VW defined: 8 (AVX2+FMA) and 16 (AVX-512F). The part of
 * the file under #elif defined(RF_VW) is written once in vmath.h's width-generic terms
 * (V_T, V_ADD, V_FN(name): name_8 or name_16, ...); the same operations on each lane at
 * either width, so the same bits. The pointwise passes (passes.h) call the width of their
 * code path. */
#if RF_HAVE_AVX2 && RF_IS_FLOAT
#define RF_VW 8
#include RF_WIDTHS_FILE
#undef RF_VW
#define RF_VW 16
#include RF_WIDTHS_FILE
#undef RF_VW
#endif
#undef RF_WIDTHS_FILE
