// Copies of client memory that survive the client shrinking its file.
//
// A page of a MAP_SHARED mapping that lies past the end of its file raises
// SIGBUS when touched. A client can DMA_MAP a memfd and then ftruncate it
// smaller; the server's next copy through that window would then kill it.
// A guarded copy catches that SIGBUS: the handler jumps back into the copy,
// which reports -EFAULT. The handler is process-wide but the copy in
// progress is per thread (connections run on their own threads), and a
// SIGBUS anywhere else goes on to the handler that was there before (Swift's
// backtracer, a sanitizer) or to the default action.
#define _GNU_SOURCE
#include "cvfu_memory.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

struct guarded_copy {
  sigjmp_buf resume;
  // The two buffers: only a fault inside one of them is the copy's.
  uintptr_t dst, src;
  size_t count;
};

// The calling thread's copy in progress, NULL outside one. Read by the
// handler, which runs on the faulting thread.
static _Thread_local struct guarded_copy *volatile active_copy;
static struct sigaction previous_action;
static pthread_once_t install_once = PTHREAD_ONCE_INIT;
static int install_result;

static bool faulted_inside(const struct guarded_copy *copy, uintptr_t address) {
  return (address - copy->dst < copy->count) || (address - copy->src < copy->count);
}

static void on_sigbus(int signal_number, siginfo_t *info, void *context) {
  struct guarded_copy *copy = active_copy;
  if (copy != NULL && faulted_inside(copy, (uintptr_t)info->si_addr)) {
    active_copy = NULL;
    siglongjmp(copy->resume, 1);
  }
  if (previous_action.sa_flags & SA_SIGINFO) {
    previous_action.sa_sigaction(signal_number, info, context);
    return;
  }
  if (previous_action.sa_handler != SIG_DFL && previous_action.sa_handler != SIG_IGN) {
    previous_action.sa_handler(signal_number);
    return;
  }
  // Returning runs the faulting access again, now under the default action:
  // the process ends with SIGBUS where it faulted, as without this handler.
  signal(SIGBUS, SIG_DFL);
}

static void install(void) {
  struct sigaction action;
  memset(&action, 0, sizeof(action));
  action.sa_sigaction = on_sigbus;
  // SA_ONSTACK: use a thread's alternate stack where one is set (a runtime's
  // handler chained from here may rely on it).
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&action.sa_mask);
  install_result = sigaction(SIGBUS, &action, &previous_action) == 0 ? 0 : -errno;
}

int cvfu_guard_install(void) {
  pthread_once(&install_once, install);
  return install_result;
}

int cvfu_guarded_copy(void *dst, const void *src, size_t count) {
  struct guarded_copy copy;
  copy.dst = (uintptr_t)dst;
  copy.src = (uintptr_t)src;
  copy.count = count;
  // No signal mask saved (that would be a system call per copy): the fault
  // path unblocks SIGBUS itself, which the kernel blocked for the handler.
  if (sigsetjmp(copy.resume, 0) != 0) {
    sigset_t bus;
    sigemptyset(&bus);
    sigaddset(&bus, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &bus, NULL);
    return -EFAULT;
  }
  active_copy = &copy;
  atomic_signal_fence(memory_order_seq_cst);
  memcpy(dst, src, count);
  atomic_signal_fence(memory_order_seq_cst);
  active_copy = NULL;
  return 0;
}

bool cvfu_file_cannot_shrink(int fd) {
  int seals = fcntl(fd, F_GET_SEALS);
  return seals >= 0 && (seals & F_SEAL_SHRINK) != 0;
}

int cvfu_seal_shrink(int fd) {
  return fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) == 0 ? 0 : -errno;
}
