/* threads.c -- how many threads the kernels may use, and running parts of a job on them.
 *
 * The kernels use as many threads as the BLAS is allowed at the time of the call, so that
 * one setting (threadpoolctl, OMP_NUM_THREADS, OPENBLAS_NUM_THREADS) governs both and the
 * two never oversubscribe. The count is read from the BLAS library that SciPy's
 * cython_blas calls into; a BLAS whose count cannot be read leaves the kernels on one
 * thread. A caller with a thread setting of its own (PyTorch) sets its thread's count
 * instead (rf_set_thread_cap), and the BLAS's through rf_find_blas_set_threads. Parts run
 * on a pool of threads started on first use (see rf_run_parts). */
#define _GNU_SOURCE  /* dladdr */
#include "rnnfuse.h"

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#define RF_HAVE_THREADS 1
#else
#define RF_HAVE_THREADS 0
#endif

/* The first of names found in the library that holds blas_function (SciPy's
 * cython_blas), searched with its dependencies, where the BLAS is; or NULL. */
static void *find_in_blas(const void *blas_function, const char *const *names, size_t n) {
#if RF_HAVE_THREADS
    Dl_info info;
    if (!blas_function || !dladdr(blas_function, &info) || !info.dli_fname) return NULL;
    void *lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!lib) return NULL;
    for (size_t i = 0; i < n; i++) {
        void *fn = dlsym(lib, names[i]);
        if (fn) return fn;  /* lib stays open: the BLAS is loaded for good */
    }
    dlclose(lib);
#else
    (void)blas_function, (void)names, (void)n;
#endif
    return NULL;
}

rf_threads_fn rf_find_blas_threads(const void *blas_function) {
    const char *const names[] = {
        "scipy_openblas_get_num_threads", "scipy_openblas_get_num_threads64_",
        "openblas_get_num_threads", "openblas_get_num_threads64_",
        "MKL_Get_Max_Threads"};
    return (rf_threads_fn)find_in_blas(blas_function, names, sizeof names / sizeof *names);
}

rf_set_threads_fn rf_find_blas_set_threads(const void *blas_function) {
    const char *const names[] = {
        "scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
        "openblas_set_num_threads", "openblas_set_num_threads64_",
        "MKL_Set_Num_Threads"};
    return (rf_set_threads_fn)find_in_blas(blas_function, names, sizeof names / sizeof *names);
}

/* The calling thread's own count (rf_set_thread_cap), 0 where it follows the BLAS. */
static _Thread_local int thread_cap;

/* A pool worker's number (1 ..), 0 in every other thread. */
static _Thread_local int worker_slot;

int rf_thread_slot(void) { return worker_slot; }

int rf_set_thread_cap(int n) {
    int previous = thread_cap;
    thread_cap = n < 0 ? 0 : n;
    return previous;
}

int rf_threads(const rf_runtime *rt) {
    int n = thread_cap ? thread_cap : rt->num_threads ? rt->num_threads() : 1;
    return n < 1 ? 1 : n > RF_MAX_THREADS ? RF_MAX_THREADS : n;
}

#if RF_HAVE_THREADS
/* The pool: workers started on first use and kept. The parts of a job go to whoever
 * claims them first, the caller included, so a worker that is slow to wake (asleep, or its
 * core busy with another process) leaves its part to the caller rather than holding the
 * call up; which part a thread runs never changes the numbers, as every part owns its
 * outputs. A second caller (another Python thread) finds the pool busy and runs its parts
 * on its own thread, one after another. Between jobs a worker spins a moment (a call's
 * parallel parts come back to back, and waking a sleeping thread is slow), then sleeps. */
#define RF_SPIN_NS 100000
#define RF_PART_BITS 8  /* the ticket's low bits: next part to claim (RF_MAX_THREADS < 256) */
#define RF_CLOSED ((UINT64_C(1) << RF_PART_BITS) - 1)
_Static_assert(RF_MAX_THREADS < RF_CLOSED, "a ticket's part bits hold every part number");
static struct {
    pthread_mutex_t busy;          /* held by the caller whose job the pool runs */
    pthread_mutex_t lock;          /* with the two conditions: sleeping and waking */
    pthread_cond_t wake, done;
    int workers;                   /* started so far */
    uint64_t first_job[RF_MAX_THREADS];  /* worker i waits for jobs after this one */
    _Atomic(void (*)(void *, int, int)) fn;
    _Atomic(void *) arg;
    atomic_int parts;
    /* job number << RF_PART_BITS | the next part to claim, RF_CLOSED while the job's
     * fields are rewritten. A part is claimed by compare-and-swap from the exact ticket
     * seen before the fields were read, so a late worker never runs a part of a job that
     * is over, or with fields half of one job and half of the next. 64 bits on every
     * system: a 32-bit counter would wrap after 2^24 jobs and a caller could wait forever. */
    _Atomic uint64_t ticket;
    _Atomic uint64_t job;          /* the job number, bumped to wake workers */
    _Atomic uint64_t finished;     /* parts of the current job that have run */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_COND_INITIALIZER, 0, {0}, NULL, NULL, 0, 0, 0, 0};

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Waits until *value is x (equal) or is no longer x (!equal): spinning a moment, then
 * asleep on cond, which is signalled under pool.lock after every change that matters. */
static int settled(_Atomic uint64_t *value, uint64_t x, int equal) {
    return (atomic_load(value) == x) == equal;
}

static void await_value(_Atomic uint64_t *value, uint64_t x, int equal, pthread_cond_t *cond) {
    long long until = now_ns() + RF_SPIN_NS;
    while (!settled(value, x, equal)) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();  /* leaves the core's other hardware thread its share */
#endif
        if (now_ns() > until) {
            pthread_mutex_lock(&pool.lock);
            while (!settled(value, x, equal)) pthread_cond_wait(cond, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
    }
}

/* Runs parts of job `job` until none is left to claim. */
static void claim_parts(uint64_t job) {
    for (;;) {
        uint64_t t = atomic_load(&pool.ticket);
        void (*fn)(void *, int, int) = atomic_load(&pool.fn);
        void *arg = atomic_load(&pool.arg);
        int parts = atomic_load(&pool.parts);
        uint64_t part = t & RF_CLOSED;
        if (t >> RF_PART_BITS != job || part >= (uint64_t)parts) return;
        if (!atomic_compare_exchange_weak(&pool.ticket, &t, t + 1)) continue;
        fn(arg, (int)part, parts);
        if (atomic_fetch_add(&pool.finished, 1) + 1 == (uint64_t)parts) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
    }
}

static void *worker(void *id) {
    uint64_t seen = pool.first_job[(intptr_t)id];
    worker_slot = (int)(intptr_t)id;
    for (;;) {
        await_value(&pool.job, seen, 0, &pool.wake);
        seen = atomic_load(&pool.job);
        claim_parts(seen);
    }
    return NULL;
}

/* A forked child has none of the parent's workers: it starts its own. Its copies of the
 * mutexes and conditions may have been held or waited on by threads that do not exist
 * there, so they are made anew (initialised, never copied: a pthread object's copy is not
 * a valid object). */
static void reset_in_child(void) {
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.workers = 0;
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, reset_in_child); }
#endif

void rf_run_parts(void (*fn)(void *arg, int part, int parts), void *arg, int parts) {
    if (parts > RF_MAX_THREADS) parts = RF_MAX_THREADS;
#if RF_HAVE_THREADS
    if (parts > 1 && pthread_mutex_trylock(&pool.busy) == 0) {
        pthread_once(&atfork_once, register_atfork);
        while (pool.workers < parts - 1) {
            pthread_t t;
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            pool.first_job[pool.workers + 1] = atomic_load(&pool.job);
            int ok = pthread_create(&t, &attr, worker, (void *)(intptr_t)(pool.workers + 1)) == 0;
            pthread_attr_destroy(&attr);
            if (!ok) break;
            pool.workers++;
        }
        uint64_t job = atomic_load(&pool.job) + 1;
        atomic_store(&pool.ticket, job << RF_PART_BITS | RF_CLOSED);
        atomic_store(&pool.fn, fn);
        atomic_store(&pool.arg, arg);
        atomic_store(&pool.parts, parts);
        atomic_store(&pool.finished, 0);
        atomic_store(&pool.ticket, job << RF_PART_BITS);
        pthread_mutex_lock(&pool.lock);
        atomic_store(&pool.job, job);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
        claim_parts(job);
        await_value(&pool.finished, (uint64_t)parts, 1, &pool.done);
        pthread_mutex_unlock(&pool.busy);
        return;
    }
#endif
    for (int i = 0; i < parts; i++) fn(arg, i, parts);
}
