//! Fuzz the weight-file reader: random corruptions of a valid manifest and blob (byte flips,
//! truncations, spliced JSON values) must open cleanly or fail with a `WeightFile` error, never
//! panic; whatever opens must only hand out in-range tensors and weight refs.

use moeflux::weights::file::{manifest_path, WeightFile, WeightWriter};
use moeflux::weights::quant::{quantize, QuantInput};
use moeflux::Error;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn valid_file(dir: &Path) -> PathBuf {
    let path = dir.join("w.bin");
    let mut w = WeightWriter::create(&path).unwrap();
    let norm: Vec<u8> = (0..64)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    w.add_raw("norm.weight", "f32", &[64], &norm).unwrap();
    let data: Vec<f32> = (0..8 * 128)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
        .collect();
    let q = quantize(QuantInput::F32(&data), 8, 128, 64, 4).unwrap();
    w.add_quantized("proj", &q, 8, 128, 64, 4).unwrap();
    w.finish().unwrap();
    path
}

/// Everything a reader hands out must lie inside the blob.
fn check_in_range(wf: &WeightFile) {
    let len = wf.len();
    let names: Vec<String> = wf.tensor_names().map(str::to_string).collect();
    for name in &names {
        let t = wf.tensor(name).unwrap();
        assert!(t.offset + t.size <= len, "{name} out of range");
        assert_eq!(wf.tensor_bytes(name).unwrap().len() as u64, t.size);
    }
    if let Ok((r, rows, cols)) = wf.weight_ref("proj") {
        assert!(r.w_off + r.packed_bytes(rows, cols) <= len);
        assert!(r.s_off + r.scale_bytes(rows, cols) <= len);
        assert!(r.b_off + r.scale_bytes(rows, cols) <= len);
    }
}

#[derive(Debug, Clone)]
enum Corruption {
    FlipManifest { at: usize, byte: u8 },
    FlipBlob { at: usize, byte: u8 },
    TruncateManifest { keep: usize },
    TruncateBlob { keep: usize },
    SpliceNumber { nth: usize, value: i64 },
}

fn corruption() -> impl Strategy<Value = Corruption> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Corruption::FlipManifest { at, byte }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Corruption::FlipBlob { at, byte }),
        any::<usize>().prop_map(|keep| Corruption::TruncateManifest { keep }),
        any::<usize>().prop_map(|keep| Corruption::TruncateBlob { keep }),
        (
            any::<usize>(),
            prop_oneof![
                Just(-1i64),
                Just(0),
                Just(1),
                Just(63),
                Just(1 << 40),
                any::<i64>()
            ]
        )
            .prop_map(|(nth, value)| Corruption::SpliceNumber { nth, value }),
    ]
}

fn apply(path: &Path, c: &Corruption) {
    let mpath = manifest_path(path);
    let mut manifest = std::fs::read(&mpath).unwrap();
    let mut blob = std::fs::read(path).unwrap();
    match *c {
        Corruption::FlipManifest { at, byte } => {
            let i = at % manifest.len();
            manifest[i] = byte;
        }
        Corruption::FlipBlob { at, byte } => {
            if !blob.is_empty() {
                let i = at % blob.len();
                blob[i] = byte;
            }
        }
        Corruption::TruncateManifest { keep } => manifest.truncate(keep % manifest.len()),
        Corruption::TruncateBlob { keep } => blob.truncate(keep % (blob.len() + 1)),
        Corruption::SpliceNumber { nth, value } => {
            // Replace the nth run of ASCII digits in the manifest by `value`.
            let text = String::from_utf8(manifest.clone()).unwrap();
            let runs: Vec<(usize, usize)> = {
                let b = text.as_bytes();
                let mut v = Vec::new();
                let mut i = 0;
                while i < b.len() {
                    if b[i].is_ascii_digit() {
                        let s = i;
                        while i < b.len() && b[i].is_ascii_digit() {
                            i += 1;
                        }
                        v.push((s, i));
                    } else {
                        i += 1;
                    }
                }
                v
            };
            let (s, e) = runs[nth % runs.len()];
            manifest = format!("{}{}{}", &text[..s], value, &text[e..]).into_bytes();
        }
    }
    std::fs::write(&mpath, manifest).unwrap();
    std::fs::write(path, blob).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn corrupted_weight_files_never_panic(c in corruption()) {
        let dir = std::env::temp_dir().join(format!("moeflux-fuzz-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = valid_file(&dir);
        apply(&path, &c);
        match WeightFile::open(&path) {
            Ok(wf) => check_in_range(&wf),
            Err(Error::WeightFile { .. }) | Err(Error::Io { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected error kind: {other}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
