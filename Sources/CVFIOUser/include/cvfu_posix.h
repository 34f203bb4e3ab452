// POSIX helpers Swift cannot reach through Glibc (they need _GNU_SOURCE),
// for threads and child processes without Foundation.
#ifndef CVFU_POSIX_H
#define CVFU_POSIX_H

#include <pthread.h>
#include <spawn.h>
#include <stdint.h>
#include <sys/types.h>

/// Names the calling thread for `top`, `ps -L` and debuggers. The kernel keeps
/// 15 bytes: a longer name is cut there. Returns 0 or -errno.
int cvfu_set_thread_name(const char *name);

/// Adds "close every descriptor from `lowfd` up" to `actions`. Returns 0 or an errno.
int cvfu_spawn_closefrom(posix_spawn_file_actions_t *actions, int lowfd);

/// Starts `path` with `argv` and `envp` (NULL: this process's environment)
/// the one way every child of this project starts: each of the `ndups`
/// pairs `dups[2i] -> dups[2i+1]` dup2'ed in the child (standard output to a
/// log file, a handover socket to descriptor 3), then every descriptor from
/// `close_from` up closed, every signal unblocked and, with `default_signals`,
/// at its default disposition (what this process ignores is not the child's
/// business). The child's pid goes to `*pid`. Returns 0 or an errno.
int cvfu_spawn(pid_t *pid, const char *path, char *const argv[], char *const envp[],
               const int *dups, int ndups, int close_from, int default_signals);

/// The real, effective and saved user and group ids (getresuid, getresgid). 0 or -errno.
int cvfu_get_credentials(uid_t uids[3], gid_t gids[3]);

/// Returns the free pages of malloc's heaps to the kernel (glibc's
/// malloc_trim). Returns 1 if memory was released, 0 if not.
int cvfu_release_free_heap(void);

/// A hang-up for ThreadSanitizer, which orders what one thread sends on a
/// socket before what another receives from it, but not a close before the
/// end of stream the peer then reads: what a client did before hanging up
/// would look unordered with the server's clean-up after it. A socket's owner
/// calls `cvfu_tsan_hang_up` just before closing it, and whoever cleans up
/// after a peer that may have hung up calls `cvfu_tsan_saw_hang_up` first.
/// Like TSan's own ordering of sockets, one order covers every socket. They do
/// nothing in a build without ThreadSanitizer.
void cvfu_tsan_hang_up(void);
void cvfu_tsan_saw_hang_up(void);

int cvfu_pin_to_cpu(int cpu);
/// Lets the calling thread run on every CPU again.
int cvfu_unpin(void);
/// Milliseconds on CLOCK_MONOTONIC.
int64_t cvfu_monotonic_ms(void);

/// A thread that waits in a blocking system call where it may be woken (a
/// connection between two of its client's messages), and the way another
/// thread wakes it: a signal without SA_RESTART, so the call returns EINTR.
/// The signal is sent only while the thread is inside its wait, and a wake
/// that races with the wait's end is taken before the thread goes on
/// (`cvfu_wake_leave`), so no other system call of that thread sees EINTR
/// from it. Costs two atomic operations per wait, no system call.
typedef struct cvfu_wake {
  int state;  // CVFU_WAKE_*, accessed with atomic builtins only
  pthread_t thread;
} cvfu_wake;

/// Binds `wake` to the calling thread; installs the signal's handler once per process.
void cvfu_wake_init(cvfu_wake *wake);
/// Just before the blocking call.
void cvfu_wake_enter(cvfu_wake *wake);
/// Just after it: waits out a wake being sent and takes its signal, so it
/// cannot interrupt a later call.
void cvfu_wake_leave(cvfu_wake *wake);
/// From another thread: interrupts the wait if the thread is in one.
/// Returns 1 when a signal was sent, 0 when the thread was not waiting (the
/// caller tries again later: a wait entered just after this returns is not
/// interrupted).
int cvfu_wake_up(cvfu_wake *wake);

/// Sends `state` (e.g. "MAINPID=1234") to the service manager's notification
/// socket ($NOTIFY_SOCKET, sd_notify(3)'s protocol: one datagram; a leading @
/// names an abstract socket). Returns 1 when sent, 0 without $NOTIFY_SOCKET,
/// or -errno.
int cvfu_sd_notify(const char *state);

#endif
