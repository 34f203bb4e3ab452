#define _GNU_SOURCE
#include "cvfu_posix.h"

#include <pthread.h>
#include <errno.h>
#include <malloc.h>
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
