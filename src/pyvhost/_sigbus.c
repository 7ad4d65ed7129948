/* SIGBUS guard for pyvhost's arenas (see sigbus.py).
 *
 * A front-end can truncate the file behind a region we have mapped; the next access to a page past the new
 * end raises SIGBUS in whichever thread touched it, usually inside compiled code.  The handler below runs in
 * that thread: if the faulting address lies in a guarded range (an arena), it maps an anonymous zero page
 * over the faulting page (MAP_FIXED), counts the fault, remembers the first address and writes the range's
 * eventfd, then returns so the access completes (reading zeros).  The control plane sees the eventfd and
 * tears the owning connection down.  A fault anywhere else gets the disposition that was there before the
 * guard (SIG_DFL, or faulthandler's, which ends in SIG_DFL): the process dies as it would have.
 *
 * Async-signal-safe: the handler touches only this file's static table (atomics), and calls mmap(), write()
 * and sigaction() (raw system calls); no Python, no malloc, no locks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAX_RANGES 1024
/* A hugetlbfs mapping cannot be split at a small page: replace the whole huge page instead. */
#define HUGE_PAGE ((uintptr_t)2 << 20)

struct range {
    uintptr_t base;
    uintptr_t size;    /* 0: free slot; written last on register, first on unregister */
    int notify_fd;     /* eventfd written on each fault, or -1 */
    unsigned long faults;
    uintptr_t first;   /* first faulting address, 0 before any */
};

static struct range ranges[MAX_RANGES];
static struct sigaction previous;
static int installed;
static uintptr_t page_size;

static int map_zero(uintptr_t addr, uintptr_t len)
{
    void *p = mmap((void *)addr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    return p == (void *)addr ? 0 : -1;
}

static void on_sigbus(int sig, siginfo_t *info, void *uctx)
{
    int saved = errno;
    uintptr_t addr = (uintptr_t)info->si_addr;
    (void)uctx;
    if (info->si_code > 0) { /* raised by a fault (si_code <= 0: sent by kill/raise: not ours) */
        for (int i = 0; i < MAX_RANGES; i++) {
            uintptr_t size = __atomic_load_n(&ranges[i].size, __ATOMIC_ACQUIRE);
            uintptr_t base = __atomic_load_n(&ranges[i].base, __ATOMIC_RELAXED);
            if (size == 0 || addr - base >= size)
                continue;
            if (map_zero(addr & ~(page_size - 1), page_size) != 0 &&
                map_zero(addr & ~(HUGE_PAGE - 1), HUGE_PAGE) != 0)
                break;  /* cannot make the page readable: the fault stays fatal */
            uintptr_t none = 0;
            __atomic_compare_exchange_n(&ranges[i].first, &none, addr, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
            __atomic_add_fetch(&ranges[i].faults, 1, __ATOMIC_RELEASE);
            int fd = __atomic_load_n(&ranges[i].notify_fd, __ATOMIC_RELAXED);
            if (fd >= 0) {
                uint64_t one = 1;
                ssize_t w = write(fd, &one, sizeof one);
                (void)w;
            }
            errno = saved;
            return;
        }
    }
    /* Not an arena fault: put back the disposition we replaced.  Returning re-executes the faulting access,
     * which then gets that disposition; a SIGBUS sent by kill() is raised again. */
    sigaction(SIGBUS, &previous, NULL);
    if (info->si_code <= 0)
        raise(sig);
    errno = saved;
}

static PyObject *py_install(PyObject *self, PyObject *noargs)
{
    (void)self; (void)noargs;
    if (!installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
        sigemptyset(&sa.sa_mask);
        page_size = (uintptr_t)sysconf(_SC_PAGESIZE);
        if (sigaction(SIGBUS, &sa, &previous) != 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        installed = 1;
    }
    Py_RETURN_NONE;
}

static PyObject *py_installed(PyObject *self, PyObject *noargs)
{
    (void)self; (void)noargs;
    struct sigaction now;
    if (sigaction(SIGBUS, NULL, &now) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(installed && (now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_sigbus);
}

static PyObject *py_guard(PyObject *self, PyObject *args)
{
    unsigned long long base, size;
    int fd;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKi", &base, &size, &fd))
        return NULL;
    if (size == 0) {
        PyErr_SetString(PyExc_ValueError, "empty range");
        return NULL;
    }
    for (int i = 0; i < MAX_RANGES; i++) {  /* callers hold the GIL: no two registrations race */
        if (__atomic_load_n(&ranges[i].size, __ATOMIC_ACQUIRE) != 0)
            continue;
        __atomic_store_n(&ranges[i].faults, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&ranges[i].first, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&ranges[i].notify_fd, fd, __ATOMIC_RELAXED);
        __atomic_store_n(&ranges[i].base, (uintptr_t)base, __ATOMIC_RELAXED);
        __atomic_store_n(&ranges[i].size, (uintptr_t)size, __ATOMIC_RELEASE);
        return PyLong_FromLong(i);
    }
    PyErr_Format(PyExc_RuntimeError, "more than %d guarded ranges", MAX_RANGES);
    return NULL;
}

static int slot_arg(PyObject *args, int *slot)
{
    if (!PyArg_ParseTuple(args, "i", slot))
        return -1;
    if (*slot < 0 || *slot >= MAX_RANGES) {
        PyErr_Format(PyExc_ValueError, "no guarded range %d", *slot);
        return -1;
    }
    return 0;
}

static PyObject *py_unguard(PyObject *self, PyObject *args)
{
    int slot;
    (void)self;
    if (slot_arg(args, &slot) < 0)
        return NULL;
    __atomic_store_n(&ranges[slot].size, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&ranges[slot].notify_fd, -1, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *py_faults(PyObject *self, PyObject *args)
{
    int slot;
    (void)self;
    if (slot_arg(args, &slot) < 0)
        return NULL;
    unsigned long n = __atomic_load_n(&ranges[slot].faults, __ATOMIC_ACQUIRE);
    uintptr_t first = __atomic_load_n(&ranges[slot].first, __ATOMIC_ACQUIRE);
    return Py_BuildValue("(kK)", n, (unsigned long long)first);
}

static PyMethodDef methods[] = {
    {"install", py_install, METH_NOARGS, "Install the SIGBUS handler (once per process)."},
    {"installed", py_installed, METH_NOARGS, "Whether the handler is the process's SIGBUS disposition now."},
    {"guard", py_guard, METH_VARARGS, "guard(base, size, notify_fd) -> slot: recover faults in [base, base+size)."},
    {"unguard", py_unguard, METH_VARARGS, "unguard(slot): stop guarding a range."},
    {"faults", py_faults, METH_VARARGS, "faults(slot) -> (count, first faulting address or 0)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "pyvhost._sigbus", NULL, -1, methods};

PyMODINIT_FUNC PyInit__sigbus(void)
{
    return PyModule_Create(&module);
}
