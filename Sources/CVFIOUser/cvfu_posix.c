#define _GNU_SOURCE
#include "cvfu_posix.h"

#include <pthread.h>
#include <string.h>

int cvfu_set_thread_name(const char *name) {
  char buf[16];
  strncpy(buf, name, sizeof buf - 1);
  buf[sizeof buf - 1] = 0;
  return -pthread_setname_np(pthread_self(), buf);
}

int cvfu_spawn_closefrom(posix_spawn_file_actions_t *actions, int lowfd) {
  return posix_spawn_file_actions_addclosefrom_np(actions, lowfd);
}
