/* threads.c -- how many threads the kernels may use, and running parts of a job on them.
 *
 * The kernels use as many threads as the BLAS is allowed at the time of the call, so that
 * one setting (threadpoolctl, OMP_NUM_THREADS, OPENBLAS_NUM_THREADS) governs both and the
 * two never oversubscribe. The count is read from the BLAS library that SciPy's
 * cython_blas calls into; a BLAS whose count cannot be read leaves the kernels on one
 * thread. Parts run on threads started for the call and joined before it returns: nothing
 * spins between calls, and nothing is left to break in a forked child. */
#define _GNU_SOURCE  /* dladdr */
#include "rnnfuse.h"

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#include <pthread.h>
#define RF_HAVE_THREADS 1
#else
#define RF_HAVE_THREADS 0
#endif

rf_threads_fn rf_find_blas_threads(const void *blas_function) {
#if RF_HAVE_THREADS
    /* the library that holds blas_function (SciPy's cython_blas), searched with its
     * dependencies, where the BLAS is */
    Dl_info info;
    if (!blas_function || !dladdr(blas_function, &info) || !info.dli_fname) return NULL;
    void *lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!lib) return NULL;
    const char *const names[] = {
        "scipy_openblas_get_num_threads", "scipy_openblas_get_num_threads64_",
        "openblas_get_num_threads", "openblas_get_num_threads64_",
        "MKL_Get_Max_Threads"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        void *fn = dlsym(lib, names[i]);
        if (fn) return (rf_threads_fn)fn;  /* lib stays open: the BLAS is loaded for good */
    }
    dlclose(lib);
#else
    (void)blas_function;
#endif
    return NULL;
}

int rf_threads(const rf_blas *blas) {
    int n = blas->num_threads ? blas->num_threads() : 1;
    return n < 1 ? 1 : n > RF_MAX_THREADS ? RF_MAX_THREADS : n;
}

#if RF_HAVE_THREADS
typedef struct {
    void (*fn)(void *arg, int part, int parts);
    void *arg;
    int part, parts;
} rf_part;

static void *run_part(void *p) {
    rf_part *q = p;
    q->fn(q->arg, q->part, q->parts);
    return NULL;
}
#endif

void rf_run_parts(void (*fn)(void *arg, int part, int parts), void *arg, int parts) {
#if RF_HAVE_THREADS
    if (parts > RF_MAX_THREADS) parts = RF_MAX_THREADS;
    rf_part part[RF_MAX_THREADS];
    pthread_t thread[RF_MAX_THREADS];
    int started[RF_MAX_THREADS] = {0};
    for (int i = 1; i < parts; i++) {
        part[i] = (rf_part){fn, arg, i, parts};
        started[i] = pthread_create(&thread[i], NULL, run_part, &part[i]) == 0;
    }
    fn(arg, 0, parts);
    for (int i = 1; i < parts; i++) {
        if (started[i]) pthread_join(thread[i], NULL);
        else fn(arg, i, parts);  /* no thread to be had: this one does the part */
    }
#else
    for (int i = 0; i < parts; i++) fn(arg, i, parts);
#endif
}
