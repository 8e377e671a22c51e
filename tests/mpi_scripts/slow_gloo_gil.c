/* LD_PRELOAD shim: a Gloo worker thread waits HOLD_US microseconds before it takes the GIL.
 *
 * That is what a busy CPU does to it now and then: a worker that drops the last reference
 * to a tensor with a Python object needs the GIL, and if the interpreter has begun to
 * finalise by the time it gets it, CPython ends the thread with pthread_exit(), whose
 * unwinding through C++ noexcept frames aborts the process ("terminate called without an
 * active exception"). With the shim a launch hits that window often instead of rarely.
 *
 * Build: cc -shared -fPIC -o slow_gloo_gil.so slow_gloo_gil.c -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef void (*acquire_fn)(void *);

void PyEval_AcquireThread(void *tstate) {
    static acquire_fn real;
    if (!real) real = (acquire_fn)dlsym(RTLD_NEXT, "PyEval_AcquireThread");
    char name[16] = {0};
    pthread_getname_np(pthread_self(), name, sizeof name);
    const char *hold = getenv("HOLD_US");
    if (hold && strncmp(name, "pt_gloo", 7) == 0) usleep((useconds_t)atoi(hold));
    real(tstate);
}
