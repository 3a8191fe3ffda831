/* Compiled by scripts/check-abi.sh: the system Ceph header first, then ours. A C compiler
 * rejects a redeclaration whose type differs, so every librados prototype in
 * rbdfence_ceph.h is checked against the installed librados; layouts and version constants
 * are checked with static assertions (the shim's struct in the shim itself, against
 * <rados/librados.hpp>). */
#include <rados/librados.h>

#define RBDFENCE_ABI_CHECK 1
#include "rbdfence_ceph.h"

#include <stddef.h>

_Static_assert(LIBRADOS_VER_MAJOR == RBDFENCE_LIBRADOS_MAJOR,
               "installed librados.h has another major version than our declarations");
_Static_assert(LIBRADOS_VER_MINOR >= RBDFENCE_LIBRADOS_MINOR,
               "installed librados.h is older than our declarations");

_Static_assert(RBDFENCE_LOCK_FLAG_MAY_RENEW == LIBRADOS_LOCK_FLAG_MAY_RENEW,
               "LIBRADOS_LOCK_FLAG_MAY_RENEW differs from ours");

int main(void) { return 0; }
