/* Compiled by scripts/check-abi.sh: the system Ceph headers first, then ours. A C compiler
 * rejects a redeclaration whose type differs, so every prototype in rbdfence_ceph.h is
 * checked against the installed librados/librbd; layouts and version constants are
 * checked with static assertions. */
#include <rados/librados.h>
#include <rbd/librbd.h>

#define RBDFENCE_ABI_CHECK 1
#include "rbdfence_ceph.h"

#include <stddef.h>

#define SAME_FIELD(ours, theirs, field)                                              \
  _Static_assert(offsetof(struct ours, field) == offsetof(theirs, field) &&           \
                     sizeof(((struct ours *)0)->field) == sizeof(((theirs *)0)->field), \
                 "layout of " #theirs "." #field " differs from ours")

_Static_assert(sizeof(struct rbdfence_image_watcher) == sizeof(rbd_image_watcher_t),
               "size of rbd_image_watcher_t differs from ours");
SAME_FIELD(rbdfence_image_watcher, rbd_image_watcher_t, addr);
SAME_FIELD(rbdfence_image_watcher, rbd_image_watcher_t, id);
SAME_FIELD(rbdfence_image_watcher, rbd_image_watcher_t, cookie);

_Static_assert(LIBRADOS_VER_MAJOR == RBDFENCE_LIBRADOS_MAJOR,
               "installed librados.h has another major version than our declarations");
_Static_assert(LIBRADOS_VER_MINOR >= RBDFENCE_LIBRADOS_MINOR,
               "installed librados.h is older than our declarations");
_Static_assert(LIBRBD_VER_MAJOR == RBDFENCE_LIBRBD_MAJOR,
               "installed librbd.h has another major version than our declarations");
_Static_assert(LIBRBD_VER_MINOR >= RBDFENCE_LIBRBD_MINOR,
               "installed librbd.h is older than our declarations");

_Static_assert(RBDFENCE_LOCK_FLAG_MAY_RENEW == LIBRADOS_LOCK_FLAG_MAY_RENEW,
               "LIBRADOS_LOCK_FLAG_MAY_RENEW differs from ours");

int main(void) { return 0; }
