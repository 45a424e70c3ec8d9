/* stress_threads.c -- the thread pool (csrc/threads.c) under load: several callers at once,
 * each running jobs of 1-6 parts of uneven length back to back; every part of every job
 * must run exactly once, with the job's own arguments. Exits 1 on the first miss, and dies
 * of SIGALRM after 120 s if a job never ends (a lost part hangs its caller). Meant
 * for ThreadSanitizer, which also reports any data race in the pool's claiming of parts:
 *
 *   gcc -O1 -g -std=c11 -fsanitize=thread -Icsrc tools/stress_threads.c csrc/threads.c \
 *       -o /tmp/stress_threads -lpthread -ldl && /tmp/stress_threads [callers] [jobs]
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "rnnfuse.h"

typedef struct {
    atomic_int runs[RF_MAX_THREADS];
    int parts;
    long work;  /* loop iterations per part, times (part + 1): parts end at different times */
} job;

static long jobs_per_caller = 20000;

static void run_part(void *arg, int part, int parts) {
    job *j = arg;
    volatile long sink = 0;
    for (long i = 0; i < j->work * (part + 1); i++) sink += i;
    if (parts != j->parts || part < 0 || part >= parts) {
        fprintf(stderr, "stress_threads: part %d of %d, for a job of %d parts\n", part, parts,
                j->parts);
        exit(1);
    }
    atomic_fetch_add(&j->runs[part], 1);
}

static void *caller(void *seed) {
    unsigned s = (unsigned)(intptr_t)seed;
    for (long n = 0; n < jobs_per_caller; n++) {
        job j = {.parts = 1 + (int)(rand_r(&s) % 6), .work = rand_r(&s) % 3000};
        for (int p = 0; p < RF_MAX_THREADS; p++) atomic_init(&j.runs[p], 0);
        rf_run_parts(run_part, &j, j.parts);
        for (int p = 0; p < j.parts; p++)
            if (atomic_load(&j.runs[p]) != 1) {
                fprintf(stderr, "stress_threads: part %d of %d ran %d times\n", p, j.parts,
                        atomic_load(&j.runs[p]));
                exit(1);
            }
    }
    return NULL;
}

int main(int argc, char **argv) {
    int callers = argc > 1 ? atoi(argv[1]) : 3;
    if (argc > 2) jobs_per_caller = atol(argv[2]);
    if (callers < 1 || callers > 16 || jobs_per_caller < 1) {
        fprintf(stderr, "usage: %s [callers 1-16] [jobs per caller]\n", argv[0]);
        return 2;
    }
    alarm(120);
    pthread_t t[16];
    for (int i = 0; i < callers; i++)
        if (pthread_create(&t[i], NULL, caller, (void *)(intptr_t)(i + 1)) != 0) {
            perror("pthread_create");
            return 1;
        }
    for (int i = 0; i < callers; i++) pthread_join(t[i], NULL);
    printf("stress_threads: %d callers x %ld jobs, every part ran once\n", callers,
           jobs_per_caller);
    return 0;
}
