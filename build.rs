//! Build script. With feature `metal-emu` it translates every MSL kernel file
//! (`shaders/metal/*.metal`, `emu/tests/kernels/*.metal`) to C++ and compiles it, with the
//! emulator runtime, into the static library `msl_emu` (see `emu/rewrite.rs`); otherwise nothing.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "metal-emu")]
    emu::build();
}

#[cfg(feature = "metal-emu")]
#[path = "emu/rewrite.rs"]
mod rewrite;

#[cfg(feature = "metal-emu")]
mod emu {
    use super::rewrite;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Flags of every emulator translation unit: MSL's arithmetic has no contraction here (so the
    /// CPU result is reproducible), and kernels type-pun freely through pointers.
    const CXX_FLAGS: &[&str] = &[
        "-std=c++17",
        "-ffp-contract=off",
        "-fno-strict-aliasing",
        "-fno-math-errno",
        "-Wno-unknown-pragmas",
        "-Wno-attributes",
    ];

    /// What the preprocessor step defines: a Metal 3.1 compiler with bfloat, no host macros.
    const PP_FLAGS: &[&str] = &[
        "-E",
        "-x",
        "c++",
        "-std=c++17",
        "-undef",
        "-nostdinc",
        "-nostdinc++",
        "-D__METAL_VERSION__=310",
        "-D__METAL__=1",
        "-D__METAL_MACOS__=1",
        "-D__HAVE_BFLOAT__=1",
    ];

    fn fnv(h: &mut u64, bytes: &[u8]) {
        for &b in bytes {
            *h ^= b as u64;
            *h = h.wrapping_mul(0x100000001b3);
        }
    }

    fn files_in(dir: &Path, ext: Option<&str>, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if ext.is_none() {
                    files_in(&p, ext, out);
                }
            } else if ext.map_or(true, |x| p.extension().is_some_and(|e| e == x)) {
                out.push(p);
            }
        }
    }

    /// `MOEFLUX_EMU_KERNELS="a,b_*"` registers (and so instantiates) only the kernels named.
    fn kernel_filter() -> impl Fn(&str) -> bool {
        let pats: Vec<String> = std::env::var("MOEFLUX_EMU_KERNELS")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        move |name: &str| {
            pats.is_empty()
                || pats.iter().any(|p| match p.strip_suffix('*') {
                    Some(prefix) => name.starts_with(prefix),
                    None => name == p,
                })
        }
    }

    fn write_if_changed(path: &Path, text: &str) {
        if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
            std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
    }

    fn newer(a: &Path, b: &Path) -> bool {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        match (m(a), m(b)) {
            (Some(x), Some(y)) => x > y,
            _ => true,
        }
    }

    fn run(mut cmd: Command, what: &str) -> Vec<u8> {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("{what}: cannot run the C++ compiler: {e}"));
        if !out.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            panic!("{what} failed (compiler output above; locations refer to .metal lines)");
        }
        out.stdout
    }

    struct Unit {
        metal: Option<PathBuf>,
        cpp: PathBuf,
        obj: PathBuf,
    }

    pub fn build() {
        let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("msl_emu");
        std::fs::create_dir_all(&out).expect("create OUT_DIR/msl_emu");
        for d in [
            "emu/include",
            "emu/runtime",
            "emu/fake_include",
            "emu/rewrite.rs",
            "emu/tests/kernels",
            "shaders/metal",
        ] {
            println!("cargo:rerun-if-changed={d}");
        }
        for v in [
            "MOEFLUX_EMU_KERNELS",
            "MOEFLUX_EMU_UCONTEXT",
            "CXX",
            "CXXFLAGS",
        ] {
            println!("cargo:rerun-if-env-changed={v}");
        }

        let mut build = cc::Build::new();
        build.cpp(true).opt_level(2).debug(false).warnings(false);
        let compiler = build.get_compiler();
        let mut flags: Vec<&str> = CXX_FLAGS.to_vec();
        // Portable ucontext fibers instead of the x86-64 switch (slower; for testing the fallback).
        if std::env::var("MOEFLUX_EMU_UCONTEXT").is_ok_and(|v| v == "1") {
            flags.push("-DMSL_EMU_UCONTEXT");
        }

        // Fingerprint of everything a translation unit depends on besides its own text.
        let mut fp = 0xcbf29ce484222325u64;
        let mut deps = Vec::new();
        files_in(&root.join("emu/include"), None, &mut deps);
        deps.push(root.join("emu/runtime/runtime.cpp"));
        deps.sort();
        for d in &deps {
            fnv(&mut fp, d.to_string_lossy().as_bytes());
            fnv(&mut fp, &std::fs::read(d).unwrap_or_default());
        }
        fnv(&mut fp, compiler.path().to_string_lossy().as_bytes());
        for a in compiler.args() {
            fnv(&mut fp, a.to_string_lossy().as_bytes());
        }
        for f in &flags {
            fnv(&mut fp, f.as_bytes());
        }
        let header = format!(
            "// generated by build.rs; inputs fingerprint {fp:016x}\n#include \"msl_cpu.h\"\n"
        );

        let mut sources = Vec::new();
        files_in(&root.join("shaders/metal"), Some("metal"), &mut sources);
        files_in(&root.join("emu/tests/kernels"), Some("metal"), &mut sources);
        sources.sort();

        let mut units: Vec<Unit> = sources
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let stem = m
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Unit {
                    metal: Some(m.clone()),
                    cpp: out.join(format!("tu{i}_{stem}.cpp")),
                    obj: out.join(format!("tu{i}_{stem}.o")),
                }
            })
            .collect();
        let runtime_cpp = out.join("runtime.cpp");
        write_if_changed(
            &runtime_cpp,
            &format!(
                "// generated by build.rs; inputs fingerprint {fp:016x}\n#include \"{}\"\n",
                root.join("emu/runtime/runtime.cpp").display()
            ),
        );
        units.push(Unit {
            metal: None,
            cpp: runtime_cpp,
            obj: out.join("runtime.o"),
        });

        let keep = kernel_filter();
        let kernels: Mutex<Vec<(usize, Vec<rewrite::KernelEntry>)>> = Mutex::new(Vec::new());
        let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let next = AtomicUsize::new(0);
        let jobs: usize = std::env::var("NUM_JOBS")
            .ok()
            .and_then(|j| j.parse().ok())
            .unwrap_or(2)
            .max(1);

        std::thread::scope(|s| {
            for _ in 0..jobs.min(units.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(u) = units.get(i) else { break };
                    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        if let Some(metal) = &u.metal {
                            let rel = metal.strip_prefix(&root).unwrap_or(metal);
                            let mut pp = compiler.to_command();
                            pp.current_dir(&root).args(PP_FLAGS);
                            pp.arg("-I").arg(root.join("shaders/metal"));
                            pp.arg("-I").arg(root.join("emu/fake_include"));
                            pp.arg(rel);
                            let text = run(pp, &format!("preprocessing {}", rel.display()));
                            let text = String::from_utf8_lossy(&text);
                            let tr = match rewrite::rewrite(&text, i as u32, &keep) {
                                Ok(t) => t,
                                Err(errs) => {
                                    for e in &errs {
                                        eprintln!("{e}");
                                    }
                                    panic!("translating {} failed (errors above)", rel.display());
                                }
                            };
                            let mut cpp = header.clone();
                            cpp.push_str(&tr.cpp);
                            cpp.push_str(&rewrite::registry_fn(i as u32, &tr.kernels));
                            write_if_changed(&u.cpp, &cpp);
                            kernels.lock().unwrap().push((i, tr.kernels));
                        }
                        if !u.obj.exists() || newer(&u.cpp, &u.obj) {
                            let mut cc = compiler.to_command();
                            cc.current_dir(&root).args(&flags);
                            cc.arg("-I").arg(root.join("emu/include"));
                            cc.arg("-c").arg(&u.cpp).arg("-o").arg(&u.obj);
                            run(cc, &format!("compiling {}", u.cpp.display()));
                        }
                    }));
                    if let Err(e) = res {
                        let msg = e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        failures.lock().unwrap().push(msg);
                    }
                });
            }
        });
        let failures = failures.into_inner().unwrap();
        if !failures.is_empty() {
            panic!("MSL emulator build failed:\n{}", failures.join("\n"));
        }

        // The registry: one explicit call per translation unit (no static initialisers).
        let mut kernels = kernels.into_inner().unwrap();
        kernels.sort_by_key(|(i, _)| *i);
        let mut seen = std::collections::HashMap::new();
        let mut reg = String::from("// generated by build.rs\n");
        for (i, ks) in &kernels {
            for k in ks {
                if let Some(prev) = seen.insert(k.name.clone(), format!("{}:{}", k.file, k.line)) {
                    panic!(
                        "kernel name `{}` defined twice: {} and {}:{}",
                        k.name, prev, k.file, k.line
                    );
                }
            }
            reg.push_str(&format!("void msl_emu_register_tu_{i}();\n"));
        }
        reg.push_str("extern \"C\" void msl_emu_register_all() {\n");
        for (i, _) in &kernels {
            reg.push_str(&format!("  msl_emu_register_tu_{i}();\n"));
        }
        reg.push_str("}\n");
        let reg_cpp = out.join("registry.cpp");
        let reg_obj = out.join("registry.o");
        write_if_changed(&reg_cpp, &reg);
        if !reg_obj.exists() || newer(&reg_cpp, &reg_obj) {
            let mut cc = compiler.to_command();
            cc.args(&flags)
                .arg("-c")
                .arg(&reg_cpp)
                .arg("-o")
                .arg(&reg_obj);
            run(cc, "compiling the kernel registry");
        }

        let mut lib = cc::Build::new();
        lib.cpp(true).cargo_metadata(true);
        for u in &units {
            lib.object(&u.obj);
        }
        lib.object(&reg_obj);
        lib.compile("msl_emu");
    }
}
