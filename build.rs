//! Generates the raw librados bindings from OUR declarations in `vendor-headers/` (never from
//! the system headers), with an explicit allowlist; compiles our one C++ shim
//! (`native/read_header.cc`, against `<rados/librados.hpp>`); links `-lrados` (Debian ships
//! no pkg-config file for it).

use std::env;
use std::path::PathBuf;

/// Every C function rbdfence calls. Keep in step with `vendor-headers/README.md`.
const FUNCTIONS: &[&str] = &[
    "rados_version",
    "rados_create",
    "rados_conf_read_file",
    "rados_conf_set",
    "rados_connect",
    "rados_shutdown",
    "rados_wait_for_latest_osdmap",
    "rados_get_instance_id",
    "rados_getaddrs",
    "rados_mon_command",
    "rados_buffer_free",
    "rados_ioctx_create",
    "rados_ioctx_destroy",
    "rados_ioctx_set_namespace",
    "rados_write_full",
    "rados_read",
    "rados_stat",
    "rados_create_write_op",
    "rados_release_write_op",
    "rados_write_op_create",
    "rados_write_op_write_full",
    "rados_write_op_operate",
    "rados_nobjects_list_open",
    "rados_nobjects_list_next",
    "rados_nobjects_list_close",
    "rados_lock_exclusive",
    "rados_unlock",
    "rbdfence_read_header_start",
    "rbdfence_header_read_result",
    "rbdfence_header_read_free",
];

const TYPES: &[&str] = &[
    "rados_t",
    "rados_ioctx_t",
    "rados_write_op_t",
    "rados_list_ctx_t",
    "rbdfence_watcher",
    "rbdfence_header_read",
    "rbdfence_read_done",
];

const VARS: &[&str] = &[
    "RBDFENCE_LIBRADOS_MAJOR",
    "RBDFENCE_LIBRADOS_MINOR",
    "RBDFENCE_LOCK_FLAG_MAY_RENEW",
];

fn main() {
    let header = "vendor-headers/rbdfence_ceph.h";
    let shim = "native/read_header.cc";
    println!("cargo:rerun-if-changed={header}");
    println!("cargo:rerun-if-changed={shim}");
    println!("cargo:rerun-if-changed=build.rs");
    // The shim first: it needs librados' C++ symbols, so -lrados must follow it.
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file(shim)
        .include("vendor-headers")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("rbdfence_shim");
    println!("cargo:rustc-link-lib=dylib=rados");

    let mut builder = bindgen::Builder::default()
        .header(header)
        .use_core()
        .layout_tests(true)
        .generate_comments(false)
        .derive_default(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for f in FUNCTIONS {
        builder = builder.allowlist_function(f);
    }
    for t in TYPES {
        builder = builder.allowlist_type(t);
    }
    for v in VARS {
        builder = builder.allowlist_var(v);
    }
    let bindings = match builder.generate() {
        Ok(b) => b,
        Err(e) => panic!("bindgen over {header} failed: {e} (is libclang-dev installed?)"),
    };
    let out = PathBuf::from(env::var("OUT_DIR").unwrap_or_else(|_| panic!("OUT_DIR is not set")));
    if let Err(e) = bindings.write_to_file(out.join("ffi.rs")) {
        panic!("cannot write bindings: {e}");
    }
}
