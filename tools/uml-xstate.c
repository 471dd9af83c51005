/*
 * LD_PRELOAD shim for Debian's User-Mode Linux 6.1 (linux.uml) on hosts whose XSAVE area is
 * larger than UML's fixed FP buffer (e.g. CPUs with AMX: ~11 KiB). The host kernel accepts
 * PTRACE_SETREGSET(NT_X86_XSTATE) only with the whole XSAVE area, so UML's smaller write fails
 * with EFAULT ("ptrace set fp regs failed, errno = 14") and the guest's init dies at once.
 *
 * Here such a write becomes: read the whole area, overlay UML's part, write the whole area.
 * The tail beyond UML's buffer (AMX tile state, which guests never enable) keeps the task's
 * own values. Everything else goes to glibc's ptrace unchanged. Built by tools/vcan-vm.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <stdarg.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>

/* <sys/ptrace.h> is not included: its prototype of ptrace takes an enum. */
#define PTRACE_GETREGSET 0x4204
#define PTRACE_SETREGSET 0x4205
#ifndef NT_X86_XSTATE
#define NT_X86_XSTATE 0x202
#endif
#define WHOLE_MAX (1 << 16)

static long (*real_ptrace)(int, pid_t, void *, void *);
static unsigned char whole[WHOLE_MAX] __attribute__((aligned(64)));

long ptrace(int request, ...)
{
    va_list ap;
    va_start(ap, request);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);
    if (!real_ptrace)
        real_ptrace = (long (*)(int, pid_t, void *, void *))dlsym(RTLD_NEXT, "ptrace");
    if (request == PTRACE_SETREGSET && (long)addr == NT_X86_XSTATE && data) {
        struct iovec *part = data;
        struct iovec all = { whole, sizeof whole };
        if (real_ptrace(PTRACE_GETREGSET, pid, addr, &all) == 0 && part->iov_len < all.iov_len) {
            memcpy(whole, part->iov_base, part->iov_len);
            return real_ptrace(PTRACE_SETREGSET, pid, addr, &all);
        }
    }
    return real_ptrace(request, pid, addr, data);
}
