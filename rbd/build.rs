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
    println!("cargo:rerun-if-changed=build.rs");
    let found = dirs.iter().find(|d| {
        Path::new(d).join("librbd.so").exists() && Path::new(d).join("librados.so").exists()
    });
    // Watch only paths that exist (a missing one makes cargo rerun this on
    // every build): the libraries where they are, else the package
    // database, which an install of librbd-dev changes.
    match found {
        Some(d) => {
            println!("cargo:rerun-if-changed={d}/librbd.so");
            println!("cargo:rerun-if-changed={d}/librados.so");
        }
        None if Path::new("/var/lib/dpkg/status").exists() => {
            println!("cargo:rerun-if-changed=/var/lib/dpkg/status");
        }
        None => {}
    }
    if std::env::var_os("SLUICE_NO_LIBRBD").is_some() {
        return;
    }
    if let Some(d) = found {
        println!("cargo:rustc-link-search=native={d}");
        println!("cargo:rustc-link-lib=dylib=rbd");
        println!("cargo:rustc-link-lib=dylib=rados");
        println!("cargo:rustc-cfg=sluice_librbd");
    }
}
