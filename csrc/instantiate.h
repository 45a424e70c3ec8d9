/* instantiate.h -- compiles the dtype-generic part of a C file once per dtype.
 *
 * A kernel file holds its dtype-free code, then defines RF_TEMPLATE_FILE as its own name
 * and includes this header, which includes the file back twice with RF_TEMPLATE defined:
 * once with REAL = float (names suffixed _f32), once with REAL = double (_f64). The part
 * of the file under #ifdef RF_TEMPLATE is written once, in terms of REAL and RF_FN(name). */
#define RF_TEMPLATE

#define REAL float
#define RF_SUFFIX f32
#define RF_IS_FLOAT 1
#define RF_BLAS_GEMM sgemm
#include RF_TEMPLATE_FILE
#undef REAL
#undef RF_SUFFIX
#undef RF_IS_FLOAT
#undef RF_BLAS_GEMM

#define REAL double
#define RF_SUFFIX f64
#define RF_IS_FLOAT 0
#define RF_BLAS_GEMM dgemm
#include RF_TEMPLATE_FILE
#undef REAL
#undef RF_SUFFIX
#undef RF_IS_FLOAT
#undef RF_BLAS_GEMM
