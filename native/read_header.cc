// rbdfence's one call into librados' C++ API: one look at an image's header object.
//
// The header object's watchers are the image's watchers (what `rbd status` shows) and the
// holders of its `rbd_lock` are the exclusive-lock owners, so the image is never opened
// (librbd's ImageCtx costs ~0.4 MiB and ~1.5 ms of CPU per image). librados has no C call
// for an object's watchers. Here one compound op on the header lists them and reads the
// lock's record (the xattr the lock class keeps, decoded by the caller), and a read of the
// image's `rbd_id` object (does the name still lead to this header?) runs at the same time:
// two OSD ops at once, for one round trip, with completion callbacks, so no thread waits.
//
// The C side hands us its rados_ioctx_t; we wrap it, ask, and copy the answers into
// rbdfence's own structs, whose layout is asserted below against the system's obj_watch_t.
// Built by build.rs; the prototype comes from our own header, so the compiler checks that it
// and this definition agree. No C++ exception crosses into the caller.
#include <rados/librados.hpp>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <list>
#include <new>
#include <string>

#include "rbdfence_ceph.h"

// Our struct must be librados' obj_watch_t field by field: offset and size of each.
#define RBDFENCE_SAME_FIELD(ours, theirs)                                                \
  static_assert(offsetof(rbdfence_watcher, ours) == offsetof(obj_watch_t, theirs) &&    \
                    sizeof(rbdfence_watcher::ours) == sizeof(obj_watch_t::theirs),      \
                "obj_watch_t." #theirs " differs from ours")
static_assert(sizeof(rbdfence_watcher) == sizeof(obj_watch_t), "obj_watch_t differs from ours");
RBDFENCE_SAME_FIELD(addr, addr);
RBDFENCE_SAME_FIELD(id, watcher_id);
RBDFENCE_SAME_FIELD(cookie, cookie);
RBDFENCE_SAME_FIELD(timeout_seconds, timeout_seconds);


// ---- One look, asynchronous: no thread waits for the OSDs. ----

struct rbdfence_header_read {
  librados::IoCtx ioctx;
  librados::ObjectReadOperation op;
  std::list<obj_watch_t> watchers;
  int watch_rval = 0;
  librados::bufferlist lock_bl;
  int lock_rval = 0;
  librados::bufferlist id_bl;
  bool want_id = false;
  int id_r = 0;
  int header_r = 0;
  librados::AioCompletion *header_c = nullptr;
  librados::AioCompletion *id_c = nullptr;
  std::atomic<int> pending{0};
  rbdfence_read_done done = nullptr;
  void *arg = nullptr;
};

namespace {

// Called by librados (a finisher thread) as each op ends; the last one reports.
void one_done(rados_completion_t, void *p) {
  auto *read = static_cast<rbdfence_header_read *>(p);
  if (read->pending.fetch_sub(1) == 1) {
    read->header_r = read->header_c->get_return_value();
    if (read->id_c != nullptr) {
      read->id_r = read->id_c->get_return_value();
    }
    read->done(read->arg, read);
  }
}

}  // namespace

extern "C" int rbdfence_read_header_start(rados_ioctx_t io, const char *header_oid,
                                          const char *lock_xattr, const char *id_oid,
                                          size_t id_max, rbdfence_read_done done, void *arg) {
  if (io == nullptr || header_oid == nullptr || lock_xattr == nullptr || done == nullptr) {
    return -EINVAL;
  }
  rbdfence_header_read *read = nullptr;
  try {
    read = new rbdfence_header_read();
    librados::IoCtx::from_rados_ioctx_t(io, read->ioctx);
    read->done = done;
    read->arg = arg;
    read->op.list_watchers(&read->watchers, &read->watch_rval);
    read->op.getxattr(lock_xattr, &read->lock_bl, &read->lock_rval);
    read->op.set_op_flags2(librados::OP_FAILOK);
    read->want_id = id_oid != nullptr;
    // Both callbacks may only report once both ops are started (or failed to start).
    read->pending = read->want_id ? 3 : 2;
    read->header_c = librados::Rados::aio_create_completion(read, one_done);
    if (read->want_id) {
      read->id_c = librados::Rados::aio_create_completion(read, one_done);
    }
    int r = read->ioctx.aio_operate(header_oid, read->header_c, &read->op, nullptr);
    if (r < 0) {
      // Nothing is in flight but, perhaps, nothing else: report the failure at once.
      read->header_c->release();
      read->header_c = nullptr;
      if (read->id_c != nullptr) {
        read->id_c->release();
        read->id_c = nullptr;
      }
      delete read;
      return r;
    }
    if (read->want_id) {
      int ri = read->ioctx.aio_read(id_oid, read->id_c, &read->id_bl, id_max, 0);
      if (ri < 0) {
        // The header op is in flight: report through it, with the read's failure.
        read->id_c->release();
        read->id_c = nullptr;
        read->id_r = ri;
        read->want_id = false;
        read->pending.fetch_sub(1);
      }
    }
    // The starter's own count: from here on the last op to end reports.
    if (read->pending.fetch_sub(1) == 1) {
      read->header_r = read->header_c->get_return_value();
      if (read->id_c != nullptr) {
        read->id_r = read->id_c->get_return_value();
      }
      read->done(read->arg, read);
    }
    return 0;
  } catch (const std::bad_alloc &) {
    return -ENOMEM;
  } catch (...) {
    return -EIO;
  }
}

extern "C" int rbdfence_header_read_result(struct rbdfence_header_read *read, char *id,
                                           size_t *id_len, int *id_result,
                                           struct rbdfence_watcher *watchers,
                                           size_t *n_watchers, char *lock, size_t *lock_len,
                                           int *lock_result) {
  if (read == nullptr || id == nullptr || id_len == nullptr || id_result == nullptr ||
      n_watchers == nullptr || lock_len == nullptr || lock_result == nullptr ||
      (watchers == nullptr && *n_watchers > 0) || (lock == nullptr && *lock_len > 0)) {
    return -EINVAL;
  }
  try {
    if (read->header_r < 0) {
      return read->header_r;
    }
    if (read->watch_rval < 0) {
      return read->watch_rval;
    }
    if (read->watchers.size() > *n_watchers ||
        (read->lock_rval >= 0 && read->lock_bl.length() > *lock_len)) {
      *n_watchers = read->watchers.size();
      *lock_len = read->lock_bl.length();
      return -ERANGE;
    }
    size_t i = 0;
    for (const obj_watch_t &w : read->watchers) {
      std::memcpy(watchers[i].addr, w.addr, sizeof(watchers[i].addr));
      watchers[i].addr[sizeof(watchers[i].addr) - 1] = '\0';
      watchers[i].id = w.watcher_id;
      watchers[i].cookie = w.cookie;
      watchers[i].timeout_seconds = w.timeout_seconds;
      ++i;
    }
    *n_watchers = i;
    *lock_result = read->lock_rval < 0 ? read->lock_rval : 0;
    if (read->lock_rval >= 0) {
      read->lock_bl.begin().copy(read->lock_bl.length(), lock);
      *lock_len = read->lock_bl.length();
    } else {
      *lock_len = 0;
    }
    if (read->id_r < 0) {
      *id_result = read->id_r;
      *id_len = 0;
    } else if (read->want_id) {
      size_t n = read->id_bl.length() < *id_len ? read->id_bl.length() : *id_len;
      read->id_bl.begin().copy(n, id);
      *id_len = n;
      *id_result = 0;
    } else {
      *id_result = -ENOENT;
      *id_len = 0;
    }
    return 0;
  } catch (const std::bad_alloc &) {
    return -ENOMEM;
  } catch (...) {
    return -EIO;
  }
}

extern "C" void rbdfence_header_read_free(struct rbdfence_header_read *read) {
  if (read == nullptr) {
    return;
  }
  if (read->header_c != nullptr) {
    read->header_c->release();
  }
  if (read->id_c != nullptr) {
    read->id_c->release();
  }
  delete read;
}
