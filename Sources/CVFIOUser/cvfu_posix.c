#define _GNU_SOURCE
#include "cvfu_posix.h"

#include <pthread.h>
#include <spawn.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sched.h>
#include <time.h>
#include <errno.h>
#include <malloc.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>

int cvfu_set_thread_name(const char *name) {
  char buf[16];
  strncpy(buf, name, sizeof buf - 1);
  buf[sizeof buf - 1] = 0;
  return -pthread_setname_np(pthread_self(), buf);
}

int cvfu_spawn_closefrom(posix_spawn_file_actions_t *actions, int lowfd) {
  return posix_spawn_file_actions_addclosefrom_np(actions, lowfd);
}

extern char **environ;

int cvfu_spawn(pid_t *pid, const char *path, char *const argv[], char *const envp[],
               const int *dups, int ndups, int close_from, int default_signals) {
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attributes;
  int rc = posix_spawn_file_actions_init(&actions);
  if (rc) return rc;
  rc = posix_spawnattr_init(&attributes);
  if (rc) {
    posix_spawn_file_actions_destroy(&actions);
    return rc;
  }
  for (int i = 0; i < ndups && !rc; i++)
    rc = posix_spawn_file_actions_adddup2(&actions, dups[2 * i], dups[2 * i + 1]);
  if (!rc) rc = posix_spawn_file_actions_addclosefrom_np(&actions, close_from);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  short flags = POSIX_SPAWN_SETSIGMASK;
  if (!rc) rc = posix_spawnattr_setsigmask(&attributes, &none);
  if (!rc && default_signals) {
    rc = posix_spawnattr_setsigdefault(&attributes, &all);
    flags |= POSIX_SPAWN_SETSIGDEF;
  }
  if (!rc) rc = posix_spawnattr_setflags(&attributes, flags);
  if (!rc) rc = posix_spawn(pid, path, &actions, &attributes, argv, envp ? envp : environ);
  posix_spawnattr_destroy(&attributes);
  posix_spawn_file_actions_destroy(&actions);
  return rc;
}

int cvfu_get_credentials(uid_t uids[3], gid_t gids[3]) {
  if (getresuid(&uids[0], &uids[1], &uids[2]) < 0) return -errno;
  if (getresgid(&gids[0], &gids[1], &gids[2]) < 0) return -errno;
  return 0;
}

int cvfu_release_free_heap(void) { return malloc_trim(0); }

#if defined(__SANITIZE_THREAD__)
#define CVFU_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CVFU_TSAN 1
#endif
#endif

#ifdef CVFU_TSAN
// The ThreadSanitizer runtime's annotations (sanitizer/tsan_interface.h).
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
static char hang_up;
void cvfu_tsan_hang_up(void) { __tsan_release(&hang_up); }
void cvfu_tsan_saw_hang_up(void) { __tsan_acquire(&hang_up); }
#else
void cvfu_tsan_hang_up(void) {}
void cvfu_tsan_saw_hang_up(void) {}
#endif

int cvfu_pin_to_cpu(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return sched_setaffinity(0, sizeof(set), &set) < 0 ? -errno : 0;
}

int cvfu_unpin(void) {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) CPU_SET(cpu, &set);
  return sched_setaffinity(0, sizeof(set), &set) < 0 ? -errno : 0;
}

int64_t cvfu_monotonic_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

// The wake signal: SIGURG, whose default action is to ignore it, so one that
// arrives before the handler is installed harms nothing; the kernel sends it
// only for TCP urgent data, which a Unix socket never has.
#define CVFU_WAKE_SIGNAL SIGURG
enum { WAKE_BUSY, WAKE_WAITING, WAKE_SENDING, WAKE_SENT };

static void cvfu_wake_handler(int signal) { (void)signal; }

static void cvfu_wake_install(void) {
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_handler = cvfu_wake_handler;
  sigemptyset(&action.sa_mask);
  action.sa_flags = 0;  // no SA_RESTART: the blocked call returns EINTR
  sigaction(CVFU_WAKE_SIGNAL, &action, NULL);
}

void cvfu_wake_init(cvfu_wake *wake) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, cvfu_wake_install);
  wake->thread = pthread_self();
  __atomic_store_n(&wake->state, WAKE_BUSY, __ATOMIC_RELEASE);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, CVFU_WAKE_SIGNAL);
  pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

void cvfu_wake_enter(cvfu_wake *wake) {
  __atomic_store_n(&wake->state, WAKE_WAITING, __ATOMIC_SEQ_CST);
}

void cvfu_wake_leave(cvfu_wake *wake) {
  int expected = WAKE_WAITING;
  if (__atomic_compare_exchange_n(&wake->state, &expected, WAKE_BUSY, 0, __ATOMIC_SEQ_CST,
                                  __ATOMIC_SEQ_CST))
    return;
  // A waker is sending or has sent the signal: wait until it is sent, then
  // let it be delivered now (any return to user space delivers it), where it
  // interrupts nothing.
  for (;;) {
    expected = WAKE_SENT;
    if (__atomic_compare_exchange_n(&wake->state, &expected, WAKE_BUSY, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST))
      break;
    sched_yield();
  }
  sched_yield();
}

int cvfu_wake_up(cvfu_wake *wake) {
  int expected = WAKE_WAITING;
  if (!__atomic_compare_exchange_n(&wake->state, &expected, WAKE_SENDING, 0, __ATOMIC_SEQ_CST,
                                   __ATOMIC_SEQ_CST)) {
    // A signal sent earlier may have landed before the call began, and been
    // lost: the thread is still WAITING under SENT. Send again.
    expected = WAKE_SENT;
    if (!__atomic_compare_exchange_n(&wake->state, &expected, WAKE_SENDING, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_SEQ_CST))
      return 0;
  }
  pthread_kill(wake->thread, CVFU_WAKE_SIGNAL);
  __atomic_store_n(&wake->state, WAKE_SENT, __ATOMIC_SEQ_CST);
  return 1;
}

int cvfu_sd_notify(const char *state) {
  const char *path = getenv("NOTIFY_SOCKET");
  if (!path || !*path) return 0;
  struct sockaddr_un address;
  memset(&address, 0, sizeof address);
  address.sun_family = AF_UNIX;
  size_t length = strlen(path);
  if (length >= sizeof address.sun_path) return -ENAMETOOLONG;
  memcpy(address.sun_path, path, length);
  if (address.sun_path[0] == '@') address.sun_path[0] = 0;
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  ssize_t n = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&address,
                     (socklen_t)(offsetof(struct sockaddr_un, sun_path) + length));
  int error = errno;
  close(fd);
  return n < 0 ? -error : 1;
}
