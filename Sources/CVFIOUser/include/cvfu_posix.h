// POSIX helpers Swift cannot reach through Glibc (they need _GNU_SOURCE),
// for threads and child processes without Foundation.
#ifndef CVFU_POSIX_H
#define CVFU_POSIX_H

#include <spawn.h>
#include <sys/types.h>

/// Names the calling thread for `top`, `ps -L` and debuggers. The kernel keeps
/// 15 bytes: a longer name is cut there. Returns 0 or -errno.
int cvfu_set_thread_name(const char *name);

/// Adds "close every descriptor from `lowfd` up" to `actions`. Returns 0 or an errno.
int cvfu_spawn_closefrom(posix_spawn_file_actions_t *actions, int lowfd);

/// The real, effective and saved user and group ids (getresuid, getresgid). 0 or -errno.
int cvfu_get_credentials(uid_t uids[3], gid_t gids[3]);

/// Returns the free pages of malloc's heaps to the kernel (glibc's
/// malloc_trim). Returns 1 if memory was released, 0 if not.
int cvfu_release_free_heap(void);

#endif
