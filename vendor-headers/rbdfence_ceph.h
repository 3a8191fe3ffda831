/*
 * rbdfence's own declarations of the part of the librados C ABI it calls, and of its one
 * C++ shim over librados' C++ API (native/read_header.cc).
 *
 * Written for rbdfence from the documented ABI of librados 3.x; it is not a copy of Ceph's
 * headers. bindgen reads only this file (see build.rs and its allowlist).
 * `scripts/check-abi.sh` compiles it together with the system header <rados/librados.h>
 * with RBDFENCE_ABI_CHECK defined, so any prototype, struct layout or constant that
 * disagrees with the installed Ceph fails the build; the shim is compiled against
 * <rados/librados.hpp> and asserts its struct's layout there. Every symbol here is listed
 * in README.md beside this file.
 */
#ifndef RBDFENCE_CEPH_H
#define RBDFENCE_CEPH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/time.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library versions these declarations were written and checked against.
 * At start-up the linked libraries must have the same major and at least this minor. */
#define RBDFENCE_LIBRADOS_MAJOR 3
#define RBDFENCE_LIBRADOS_MINOR 0

/* Opaque handles: plain pointers in the ABI. */
typedef void *rados_t;
typedef void *rados_ioctx_t;

/* ---- librados: version, set-up and teardown ---- */
void rados_version(int *major, int *minor, int *extra);
int rados_create(rados_t *cluster, const char *id);
int rados_conf_read_file(rados_t cluster, const char *path);
int rados_conf_set(rados_t cluster, const char *option, const char *value);
int rados_connect(rados_t cluster);
void rados_shutdown(rados_t cluster);

/* ---- librados: cluster state ---- */
int rados_wait_for_latest_osdmap(rados_t cluster);
uint64_t rados_get_instance_id(rados_t cluster);
int rados_getaddrs(rados_t cluster, char **addrs);

/* ---- librados: monitor commands (JSON in, JSON/text out) ---- */
int rados_mon_command(rados_t cluster, const char **cmd, size_t cmdlen,
                      const char *inbuf, size_t inbuflen,
                      char **outbuf, size_t *outbuflen,
                      char **outs, size_t *outslen);
void rados_buffer_free(char *buf);

/* ---- librados: pools and objects ---- */
int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx);
void rados_ioctx_destroy(rados_ioctx_t io);
/* Every later operation on this ioctx addresses objects in namespace nspace ("" or NULL: the
 * default namespace). Not thread-safe: set once, before the ioctx is shared. */
void rados_ioctx_set_namespace(rados_ioctx_t io, const char *nspace);

/* ---- librados: whole objects (the fence ledger) ---- */
/* Replaces the object's data with len bytes of buf (creates it if missing). */
int rados_write_full(rados_ioctx_t io, const char *oid, const char *buf, size_t len);
/* Reads up to len bytes from offset off; returns the number of bytes read. */
int rados_read(rados_ioctx_t io, const char *oid, char *buf, size_t len, uint64_t off);
/* Size and modification time of an object; -ENOENT when it does not exist. */
int rados_stat(rados_ioctx_t io, const char *o, uint64_t *psize, time_t *pmtime);

/* A compound write: created, filled, run on one object atomically, released. */
typedef void *rados_write_op_t;
rados_write_op_t rados_create_write_op(void);
void rados_release_write_op(rados_write_op_t write_op);
/* exclusive = 1: the whole op fails with -EEXIST when the object exists already. */
void rados_write_op_create(rados_write_op_t write_op, int exclusive, const char *category);
void rados_write_op_write_full(rados_write_op_t write_op, const char *buffer, size_t len);
int rados_write_op_operate(rados_write_op_t write_op, rados_ioctx_t io, const char *oid,
                           time_t *mtime, int flags);

/* Listing the objects of the ioctx's namespace. */
typedef void *rados_list_ctx_t;
int rados_nobjects_list_open(rados_ioctx_t io, rados_list_ctx_t *ctx);
/* Next object: entry is its name (valid until the next call); -ENOENT at the end. */
int rados_nobjects_list_next(rados_list_ctx_t ctx, const char **entry, const char **key,
                             const char **nspace);
void rados_nobjects_list_close(rados_list_ctx_t ctx);

/* Advisory cls locks with a lease: one holder (name, cookie) at a time; a holder that stops
 * renewing loses the lock when `duration` runs out. -EBUSY: another holder has it. */
#define RBDFENCE_LOCK_FLAG_MAY_RENEW 1u
int rados_lock_exclusive(rados_ioctx_t io, const char *oid, const char *name,
                         const char *cookie, const char *desc, struct timeval *duration,
                         uint8_t flags);
int rados_unlock(rados_ioctx_t io, const char *o, const char *name, const char *cookie);

/* ---- rbdfence's shim over librados' C++ API (native/read_header.cc) ---- */
/* One watcher of an object; the layout of librados' obj_watch_t (asserted in the shim). */
struct rbdfence_watcher {
  char addr[256];           /* entity address, "v1:IP:PORT/NONCE" or "IP:PORT/NONCE" */
  int64_t id;               /* global client id (the N of client.N) */
  uint64_t cookie;          /* watch cookie */
  uint32_t timeout_seconds; /* the watch's timeout */
};
/* One look at an image's header object header_oid, two OSD ops at once, asynchronous: a
 * compound op on the header listing its watchers and reading its xattr lock_xattr (the lock
 * class's record of a lock; -ENODATA when no lock was ever taken), and, when id_oid is not
 * NULL, a read of at most id_max bytes of object id_oid (the image's rbd_id). Every op is
 * bounded by the connection's rados_osd_op_timeout.
 * rbdfence_read_header_start starts the two ops and returns 0;
 * done(arg, read) is then called exactly once, from a librados thread (or from this one, when
 * the ops ended at once), when both have ended. The caller copies the answers with
 * rbdfence_header_read_result as often as it needs: at most *n_watchers watchers, at most
 * *lock_len bytes of the lock record (*lock_result 0, or the -errno of reading it), the id
 * read (*id_len bytes, *id_result 0 or -errno; -ENOENT when id_oid was NULL); it returns 0
 * with the counts set, -ERANGE with *n_watchers and *lock_len set to what is needed, or the
 * -errno of the header op (-ENOENT: no such header object). Then the caller frees it with
 * rbdfence_header_read_free. A start that returns -errno calls done never. */
struct rbdfence_header_read;
typedef void (*rbdfence_read_done)(void *arg, struct rbdfence_header_read *read);
int rbdfence_read_header_start(rados_ioctx_t io, const char *header_oid, const char *lock_xattr,
                               const char *id_oid, size_t id_max, rbdfence_read_done done,
                               void *arg);
int rbdfence_header_read_result(struct rbdfence_header_read *read, char *id, size_t *id_len,
                                int *id_result, struct rbdfence_watcher *watchers,
                                size_t *n_watchers, char *lock, size_t *lock_len,
                                int *lock_result);
void rbdfence_header_read_free(struct rbdfence_header_read *read);

#ifdef __cplusplus
}
#endif

#endif /* RBDFENCE_CEPH_H */
