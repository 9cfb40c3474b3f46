//! Links librbd and librados when the machine has them (Debian's
//! `librbd-dev` and `librados-dev`: the unversioned `librbd.so` and
//! `librados.so` links); then `cfg(sluice_librbd)` turns the driver on.
//! Without them the crate builds a driver whose every open says that sluice
//! was built without librbd, and the rest of the workspace is unchanged.
//! No bindgen, no libclang: the declarations are hand-written (`src/ffi.rs`).

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(sluice_librbd)");
    println!("cargo:rerun-if-env-changed=SLUICE_NO_LIBRBD");
    let dirs = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    ];
    for d in dirs {
        println!("cargo:rerun-if-changed={d}/librbd.so");
    }
    if std::env::var_os("SLUICE_NO_LIBRBD").is_some() {
        return;
    }
    let found = dirs.iter().find(|d| {
        Path::new(d).join("librbd.so").exists() && Path::new(d).join("librados.so").exists()
    });
    if let Some(d) = found {
        println!("cargo:rustc-link-search=native={d}");
        println!("cargo:rustc-link-lib=dylib=rbd");
        println!("cargo:rustc-link-lib=dylib=rados");
        println!("cargo:rustc-cfg=sluice_librbd");
    }
}
