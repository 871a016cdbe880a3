//! The moeflux weight file: one blob of 64-byte-aligned tensors, mmap'd read-only, described by
//! a JSON manifest at `<blob path>.json`.
//!
//! Manifest: `{"format": "moeflux-weights", "version": 1, "file_size": N, "tensors": {name:
//! {"offset", "size", "shape", "dtype", "bits"?, "group_size"?}}}`, dtype one of `f32 bf16 f16 u32
//! u8`, all data little-endian. A quantized matrix `NAME` is stored MLX-style as `NAME.weight`
//! (u32 packed, carrying `bits` and `group_size`), `NAME.scales` and `NAME.biases`.

use crate::error::{Error, Result};
use crate::graph::{WDtype, WeightRef};
use crate::weights::quant::{Quantized, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Value of the manifest's `format` field.
pub const FORMAT: &str = "moeflux-weights";
/// Manifest version this code reads and writes.
pub const VERSION: u32 = 1;
/// Alignment of every tensor's offset in the blob.
pub const ALIGN: u64 = 64;

/// One tensor of the manifest: its byte range in the blob, shape, element type and, for packed
/// quantized weights, the quantization parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    pub offset: u64,
    pub size: u64,
    pub shape: Vec<u64>,
    pub dtype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<u32>,
}

impl TensorInfo {
    /// Number of elements (`None` on overflow).
    pub fn numel(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
    }
}

/// Bytes per element of a manifest dtype name (`None` if unknown).
pub fn dtype_size(dtype: &str) -> Option<u64> {
    match dtype {
        "f32" | "u32" => Some(4),
        "bf16" | "f16" => Some(2),
        "u8" => Some(1),
        _ => None,
    }
}

/// The manifest path for a blob: `<path>.json`.
pub fn manifest_path(path: &Path) -> PathBuf {
    with_suffix(path, ".json")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    file_size: u64,
    tensors: BTreeMap<String, TensorInfo>,
}

/// Writes a weight file: tensors go to `<path>.partial` and the manifest to
/// `<path>.json.partial`; [`finish`](Self::finish) renames both into place. Dropping an
/// unfinished writer deletes the partial files, so the final paths only ever hold complete files.
pub struct WeightWriter {
    path: PathBuf,
    out: Option<BufWriter<File>>,
    offset: u64,
    tensors: BTreeMap<String, TensorInfo>,
    finished: bool,
}

impl WeightWriter {
    /// Start writing the weight file `path` (its manifest will be `<path>.json`).
    pub fn create(path: &Path) -> Result<Self> {
        let partial = with_suffix(path, ".partial");
        let file = File::create(&partial).map_err(|e| Error::io(partial.display(), e))?;
        Ok(WeightWriter {
            path: path.to_path_buf(),
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            offset: 0,
            tensors: BTreeMap::new(),
            finished: false,
        })
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::weight_file(self.path.display(), msg)
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        crate::ensure!(!name.is_empty(), self.err("empty tensor name"));
        crate::ensure!(
            !self.tensors.contains_key(name),
            self.err(format!("tensor `{name}` added twice"))
        );
        Ok(())
    }

    /// Pad to [`ALIGN`], let `write` emit exactly `info.size` bytes, record the tensor.
    fn write_tensor(
        &mut self,
        name: &str,
        mut info: TensorInfo,
        write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
    ) -> Result<()> {
        let partial = with_suffix(&self.path, ".partial");
        let io_err = |e| Error::io(partial.display(), e);
        let out = self.out.as_mut().expect("writer used after finish");
        let pad = (ALIGN - self.offset % ALIGN) % ALIGN;
        out.write_all(&[0u8; ALIGN as usize][..pad as usize])
            .map_err(io_err)?;
        info.offset = self.offset + pad;
        write(out).map_err(io_err)?;
        self.offset = info.offset + info.size;
        self.tensors.insert(name.to_string(), info);
        Ok(())
    }

    /// Add a raw tensor. `dtype` is one of `f32 bf16 f16 u32 u8`; `bytes` (little-endian) must be
    /// exactly `prod(shape) * dtype size` long.
    pub fn add_raw(&mut self, name: &str, dtype: &str, shape: &[u64], bytes: &[u8]) -> Result<()> {
        self.check_new_name(name)?;
        let esize = dtype_size(dtype).ok_or_else(|| {
            self.err(format!(
                "tensor `{name}`: unknown dtype `{dtype}` (expected f32, bf16, f16, u32 or u8)"
            ))
        })?;
        let info = TensorInfo {
            offset: 0,
            size: bytes.len() as u64,
            shape: shape.to_vec(),
            dtype: dtype.to_string(),
            bits: None,
            group_size: None,
        };
        let want = info.numel().and_then(|n| n.checked_mul(esize));
        crate::ensure!(
            want == Some(bytes.len() as u64),
            self.err(format!(
                "tensor `{name}`: {} bytes given, shape {shape:?} of {dtype} needs {}",
                bytes.len(),
                want.map_or("more than 2^64".to_string(), |w| w.to_string())
            ))
        );
        self.write_tensor(name, info, |out| out.write_all(bytes))
    }

    /// Add `NAME.weight` / `NAME.scales` / `NAME.biases` for an already quantized `[rows, cols]`
    /// matrix (see [`crate::weights::quant::quantize`]).
    pub fn add_quantized(
        &mut self,
        name: &str,
        q: &Quantized,
        rows: u64,
        cols: u64,
        group_size: u32,
        bits: u32,
    ) -> Result<()> {
        let (wn, sn, bn) = (
            format!("{name}.weight"),
            format!("{name}.scales"),
            format!("{name}.biases"),
        );
        for n in [&wn, &sn, &bn] {
            self.check_new_name(n)?;
        }
        let bad = |msg: String| self.err(format!("quantized `{name}` [{rows}, {cols}]: {msg}"));
        crate::ensure!(
            SUPPORTED_BITS.contains(&bits)
                && SUPPORTED_GROUP_SIZES.contains(&(group_size as usize))
                && cols % group_size as u64 == 0,
            bad(format!(
                "unsupported bits = {bits} / group_size = {group_size}, or cols not a multiple of the group"
            ))
        );
        let words = rows.checked_mul(cols).map(|n| n / 32 * bits as u64);
        crate::ensure!(
            words == Some(q.packed.len() as u64),
            bad(format!(
                "{} packed words, expected rows * cols * bits / 32",
                q.packed.len()
            ))
        );
        let groups = rows * (cols / group_size as u64);
        crate::ensure!(
            q.scales.len() as u64 == groups && q.biases.len() as u64 == groups,
            bad(format!(
                "{} scales and {} biases, expected {groups}",
                q.scales.len(),
                q.biases.len()
            ))
        );
        crate::ensure!(
            q.scales.dtype() == q.biases.dtype(),
            bad(format!(
                "scales are {} but biases are {}",
                q.scales.dtype().name(),
                q.biases.dtype().name()
            ))
        );
        let sdtype = q.scales.dtype();
        let packed = TensorInfo {
            offset: 0,
            size: q.packed.len() as u64 * 4,
            shape: vec![rows, cols * bits as u64 / 32],
            dtype: "u32".into(),
            bits: Some(bits),
            group_size: Some(group_size),
        };
        self.write_tensor(&wn, packed, |out| {
            for chunk in q.packed.chunks(1 << 14) {
                let b: Vec<u8> = chunk.iter().flat_map(|w| w.to_le_bytes()).collect();
                out.write_all(&b)?;
            }
            Ok(())
        })?;
        for (n, v) in [(&sn, &q.scales), (&bn, &q.biases)] {
            let info = TensorInfo {
                offset: 0,
                size: groups * sdtype.size(),
                shape: vec![rows, cols / group_size as u64],
                dtype: sdtype.name().into(),
                bits: None,
                group_size: None,
            };
            let bytes = v.as_ref().to_le_bytes();
            self.write_tensor(n, info, |out| out.write_all(&bytes))?;
        }
        Ok(())
    }

    /// Flush and sync both files, then rename them into place: any old manifest is removed
    /// first, then the blob is renamed, then the manifest, so a reader never pairs a new blob
    /// with an old manifest.
    pub fn finish(mut self) -> Result<()> {
        let partial = with_suffix(&self.path, ".partial");
        let json_path = manifest_path(&self.path);
        let json_partial = with_suffix(&json_path, ".partial");
        let out = self.out.take().expect("finish called once");
        let file = out
            .into_inner()
            .map_err(|e| Error::io(partial.display(), e.into_error()))?;
        file.sync_all()
            .map_err(|e| Error::io(partial.display(), e))?;
        drop(file);

        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            file_size: self.offset,
            tensors: std::mem::take(&mut self.tensors),
        };
        let json = serde_json::to_vec(&manifest)
            .map_err(|e| self.err(format!("cannot serialise manifest: {e}")))?;
        let write_json = || -> std::io::Result<()> {
            let mut f = File::create(&json_partial)?;
            f.write_all(&json)?;
            f.sync_all()
        };
        write_json().map_err(|e| Error::io(json_partial.display(), e))?;

        match fs::remove_file(&json_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(json_path.display(), e))
            }
            _ => {}
        }
        fs::rename(&partial, &self.path).map_err(|e| Error::io(self.path.display(), e))?;
        fs::rename(&json_partial, &json_path).map_err(|e| Error::io(json_path.display(), e))?;
        self.finished = true;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Best effort: make the renames durable.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for WeightWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_file(with_suffix(&self.path, ".partial"));
            let _ = fs::remove_file(with_suffix(&manifest_path(&self.path), ".partial"));
        }
    }
}

/// An open, validated weight file: the blob mapped read-only plus its manifest.
///
/// The blob must not be modified or truncated while open (the mapping would see it, and a
/// truncation faults on access).
#[derive(Debug)]
pub struct WeightFile {
    path: PathBuf,
    /// `None` for an empty blob (mapping 0 bytes fails on Linux).
    map: Option<Mmap>,
    tensors: BTreeMap<String, TensorInfo>,
}

impl WeightFile {
    /// Map the blob at `path`, parse `<path>.json` and validate every tensor: format and
    /// version, `file_size` against the blob's actual size, known dtypes, `size == prod(shape) *
    /// dtype size`, 64-byte-aligned offsets, ranges inside the blob, and for packed tensors
    /// (`bits`/`group_size`, required on u32 `*.weight`) supported parameters and a consistent
    /// `NAME.scales`/`NAME.biases` pair. Errors are `Error::WeightFile` naming the path, the
    /// tensor and the numbers involved.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |msg: String| Error::weight_file(path.display(), msg);
        let json_path = manifest_path(path);
        let json = fs::read(&json_path)
            .map_err(|e| err(format!("cannot read manifest {}: {e}", json_path.display())))?;
        let m: Manifest = serde_json::from_slice(&json)
            .map_err(|e| err(format!("bad manifest {}: {e}", json_path.display())))?;
        crate::ensure!(
            m.format == FORMAT,
            err(format!(
                "manifest format is `{}`, expected `{FORMAT}`",
                m.format
            ))
        );
        crate::ensure!(
            m.version == VERSION,
            err(format!(
                "manifest version {} is not supported (expected {VERSION})",
                m.version
            ))
        );
        let file = File::open(path).map_err(|e| err(format!("cannot open blob: {e}")))?;
        let actual = file
            .metadata()
            .map_err(|e| err(format!("cannot stat blob: {e}")))?
            .len();
        crate::ensure!(
            actual == m.file_size,
            err(format!(
                "blob is {actual} bytes but the manifest says file_size = {} (truncated or replaced?)",
                m.file_size
            ))
        );
        for (name, t) in &m.tensors {
            check_tensor(name, t, m.file_size)
                .map_err(|msg| err(format!("tensor `{name}`: {msg}")))?;
        }
        let map = if actual == 0 {
            None
        } else {
            // SAFETY: read-only mapping; the caller keeps the file unchanged while it is open
            // (documented on the type).
            Some(unsafe { Mmap::map(&file) }.map_err(|e| err(format!("mmap failed: {e}")))?)
        };
        let wf = WeightFile {
            path: path.to_path_buf(),
            map,
            tensors: m.tensors,
        };
        for name in wf.tensors.keys() {
            if let Some(base) = name.strip_suffix(".weight") {
                if wf.tensors[name].bits.is_some() {
                    wf.weight_ref(base)?;
                }
            }
        }
        Ok(wf)
    }

    /// The whole blob.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Blob size in bytes.
    pub fn len(&self) -> u64 {
        self.bytes().len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The manifest entry of `name`.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::weight_file(self.path.display(), format!("no tensor `{name}`")))
    }

    /// All tensor names, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The bytes of tensor `name` (64-byte aligned in memory, since the mapping is page aligned).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor(name)?;
        // In range: checked against the blob size by `open`.
        Ok(&self.bytes()[t.offset as usize..(t.offset + t.size) as usize])
    }

    /// The quantized matrix `NAME` from `NAME.weight`, `NAME.scales`, `NAME.biases`, with its
    /// `(rows, cols)`. A weight of rank > 2 (stacked experts `[E, out, in]`) is viewed as
    /// `[prod(leading dims), cols]`. Checks the packed tensor carries bits and group size, scales
    /// and biases are f32/bf16/f16 of one dtype, and their shapes are the weight's with the last
    /// dim `cols / group_size`.
    pub fn weight_ref(&self, name: &str) -> Result<(WeightRef, u64, u64)> {
        let err = |msg: String| {
            Error::weight_file(
                self.path.display(),
                format!("quantized weight `{name}`: {msg}"),
            )
        };
        let w = self.tensor(&format!("{name}.weight"))?;
        let s = self.tensor(&format!("{name}.scales"))?;
        let b = self.tensor(&format!("{name}.biases"))?;
        let (Some(bits), Some(group)) = (w.bits, w.group_size) else {
            return Err(err(format!(
                "`{name}.weight` ({} {:?}) has no bits/group_size",
                w.dtype, w.shape
            )));
        };
        crate::ensure!(
            w.dtype == "u32",
            err(format!("`{name}.weight` is {}, not u32", w.dtype))
        );
        let scale_dtype = match s.dtype.as_str() {
            "f32" | "bf16" | "f16" => WDtype::from_name(&s.dtype).expect("known float dtype"),
            other => {
                return Err(err(format!(
                    "scales dtype is {other}, expected f32, bf16 or f16"
                )))
            }
        };
        crate::ensure!(
            b.dtype == s.dtype,
            err(format!("biases are {} but scales are {}", b.dtype, s.dtype))
        );
        crate::ensure!(
            w.shape.len() >= 2,
            err(format!("weight shape {:?} has rank < 2", w.shape))
        );
        let (lead, words) = w.shape.split_at(w.shape.len() - 1);
        let cols = words[0] * 32 / bits as u64;
        let mut want = lead.to_vec();
        want.push(cols / group as u64);
        for (what, t) in [("scales", s), ("biases", b)] {
            crate::ensure!(
                t.shape == want,
                err(format!(
                    "{what} shape {:?}, expected {want:?} for weight {:?} (cols = {cols}, group_size = {group})",
                    t.shape, w.shape
                ))
            );
        }
        let rows = lead.iter().product();
        let wref = WeightRef {
            w_off: w.offset,
            s_off: s.offset,
            b_off: b.offset,
            bits,
            group_size: group,
            scale_dtype,
        };
        Ok((wref, rows, cols))
    }
}

/// Checks one manifest entry on its own; the message names the offending numbers.
fn check_tensor(name: &str, t: &TensorInfo, file_size: u64) -> std::result::Result<(), String> {
    let esize = dtype_size(&t.dtype).ok_or_else(|| {
        format!(
            "unknown dtype `{}` (expected f32, bf16, f16, u32 or u8)",
            t.dtype
        )
    })?;
    let want = t.numel().and_then(|n| n.checked_mul(esize));
    if want != Some(t.size) {
        return Err(format!(
            "size {} but shape {:?} of {} needs {}",
            t.size,
            t.shape,
            t.dtype,
            want.map_or("more than 2^64".to_string(), |w| w.to_string())
        ));
    }
    if t.offset % ALIGN != 0 {
        return Err(format!("offset {} is not {ALIGN}-byte aligned", t.offset));
    }
    match t.offset.checked_add(t.size) {
        Some(end) if end <= file_size => {}
        _ => {
            return Err(format!(
                "bytes [{}, {} + {}) exceed the blob's {file_size} bytes",
                t.offset, t.offset, t.size
            ))
        }
    }
    match (t.bits, t.group_size) {
        (None, None) => {
            if t.dtype == "u32" && name.ends_with(".weight") {
                return Err("packed u32 weight without bits/group_size".into());
            }
        }
        (Some(bits), Some(group)) => {
            if t.dtype != "u32" {
                return Err(format!(
                    "has bits/group_size but dtype {}, not u32",
                    t.dtype
                ));
            }
            if !SUPPORTED_BITS.contains(&bits) {
                return Err(format!("bits = {bits} not supported ({SUPPORTED_BITS:?})"));
            }
            if !SUPPORTED_GROUP_SIZES.contains(&(group as usize)) {
                return Err(format!(
                    "group_size = {group} not supported ({SUPPORTED_GROUP_SIZES:?})"
                ));
            }
            let words = match t.shape.last() {
                Some(&w) if t.shape.len() >= 2 => w,
                _ => return Err(format!("packed shape {:?} has rank < 2", t.shape)),
            };
            let packed_bits = words.saturating_mul(32);
            if packed_bits % bits as u64 != 0 || (packed_bits / bits as u64) % group as u64 != 0 {
                return Err(format!(
                    "{words} words per row do not hold a multiple of group_size = {group} codes of {bits} bits"
                ));
            }
        }
        _ => return Err("bits and group_size must be given together".into()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::view::QuantMatrix;
    use crate::weights::quant::{dequantize, quantize, QuantInput};
    use half::bf16;
    use serde_json::Value;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 * (2f32).powi(-23) - 1.0
        }
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TmpDir(PathBuf);
    impl TmpDir {
        fn new(tag: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let d = std::env::temp_dir().join(format!(
                "moeflux-wf-{}-{}-{tag}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&d).unwrap();
            TmpDir(d)
        }
        fn blob(&self) -> PathBuf {
            self.0.join("weights.bin")
        }
    }
    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn msg(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::WeightFile { path, msg }) => format!("{path}: {msg}"),
            other => panic!("expected Error::WeightFile, got {other:?}"),
        }
    }

    /// A small file: a raw f32 vector, a raw u8 tensor, a bf16 quantized matrix.
    fn write_sample(path: &Path) -> (Vec<f32>, Vec<u8>, Vec<bf16>) {
        let mut rng = Rng(0xfeed_beef_1234_5679);
        let norm: Vec<f32> = (0..13).map(|_| rng.unit()).collect();
        let raw: Vec<u8> = (0..7).map(|_| rng.next() as u8).collect();
        let w: Vec<bf16> = (0..6 * 128)
            .map(|_| bf16::from_f32(rng.unit() * 0.1))
            .collect();
        let q = quantize(QuantInput::Bf16(&w), 6, 128, 64, 4).unwrap();
        let mut wr = WeightWriter::create(path).unwrap();
        let nb: Vec<u8> = norm.iter().flat_map(|x| x.to_le_bytes()).collect();
        wr.add_raw("model.norm.weight", "f32", &[13], &nb).unwrap();
        wr.add_raw("odd.bytes", "u8", &[7], &raw).unwrap();
        wr.add_quantized("layer.proj", &q, 6, 128, 64, 4).unwrap();
        wr.finish().unwrap();
        (norm, raw, w)
    }

    fn edit_manifest(path: &Path, f: impl FnOnce(&mut Value)) {
        let jp = manifest_path(path);
        let mut v: Value = serde_json::from_slice(&fs::read(&jp).unwrap()).unwrap();
        f(&mut v);
        fs::write(&jp, serde_json::to_vec(&v).unwrap()).unwrap();
    }

    #[test]
    fn round_trip() {
        let d = TmpDir::new("rt");
        let (norm, raw, w) = write_sample(&d.blob());
        let wf = WeightFile::open(&d.blob()).unwrap();
        assert_eq!(wf.path(), d.blob());
        assert_eq!(wf.len(), fs::metadata(d.blob()).unwrap().len());
        let names: Vec<&str> = wf.tensor_names().collect();
        assert_eq!(
            names,
            [
                "layer.proj.biases",
                "layer.proj.scales",
                "layer.proj.weight",
                "model.norm.weight",
                "odd.bytes"
            ]
        );
        for n in &names {
            let t = wf.tensor(n).unwrap();
            assert_eq!(t.offset % ALIGN, 0, "{n}");
            assert_eq!(wf.tensor_bytes(n).unwrap().len() as u64, t.size);
            assert_eq!(
                wf.tensor_bytes(n).unwrap().as_ptr() as usize % ALIGN as usize,
                0
            );
        }
        let got: Vec<f32> = wf
            .tensor_bytes("model.norm.weight")
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, norm);
        assert_eq!(wf.tensor_bytes("odd.bytes").unwrap(), &raw[..]);
        let t = wf.tensor("layer.proj.weight").unwrap();
        assert_eq!(
            (t.bits, t.group_size, t.shape.clone()),
            (Some(4), Some(64), vec![6, 16])
        );

        // The matrix read back through weight_ref and view.rs dequantizes like the original.
        let (wref, rows, cols) = wf.weight_ref("layer.proj").unwrap();
        assert_eq!((rows, cols, wref.bits, wref.group_size), (6, 128, 4, 64));
        assert_eq!(wref.scale_dtype, WDtype::Bf16);
        let m = QuantMatrix::from_ref(wf.bytes(), &wref, 6, 128).unwrap();
        let q = quantize(QuantInput::Bf16(&w), 6, 128, 64, 4).unwrap();
        assert_eq!(m.packed, &q.packed[..]);
        for g in 0..12 {
            assert_eq!(m.scales.get(g), q.scales.get(g));
            assert_eq!(m.biases.get(g), q.biases.get(g));
        }
        let a = dequantize(
            &q.packed,
            &q.scales.as_ref(),
            &q.biases.as_ref(),
            6,
            128,
            64,
            4,
        );
        // Independent f64 dequantization of the bytes in the file.
        for (i, &x) in a.unwrap().iter().enumerate() {
            let (r, c) = (i / 128, i % 128);
            let code = (m.packed[r * 16 + c / 8] >> (4 * (c % 8))) & 15;
            let g = r * 2 + c / 64;
            let (sq, b) = (m.scales.get(g) as f64 * code as f64, m.biases.get(g) as f64);
            let want = sq + b;
            // bf16 rounds the product and the sum: half an ulp (2^-9 relative) each.
            assert!(
                (x as f64 - want).abs() <= (sq.abs() + b.abs()) * 2f64.powi(-8),
                "{i}: {x} vs {want}"
            );
        }
    }

    #[test]
    fn empty_blob() {
        let d = TmpDir::new("empty");
        WeightWriter::create(&d.blob()).unwrap().finish().unwrap();
        assert_eq!(fs::metadata(d.blob()).unwrap().len(), 0);
        let wf = WeightFile::open(&d.blob()).unwrap();
        assert!(wf.is_empty());
        assert_eq!(wf.bytes(), &[] as &[u8]);
        assert_eq!(wf.tensor_names().count(), 0);
        assert!(msg(wf.tensor("x")).contains("no tensor `x`"));

        // Zero-sized tensors in an otherwise empty blob.
        let d = TmpDir::new("empty2");
        let mut wr = WeightWriter::create(&d.blob()).unwrap();
        wr.add_raw("nothing", "f32", &[0, 4], &[]).unwrap();
        wr.finish().unwrap();
        let wf = WeightFile::open(&d.blob()).unwrap();
        assert_eq!(wf.tensor_bytes("nothing").unwrap(), &[] as &[u8]);
    }

    #[test]
    fn atomic_finish_and_cleanup() {
        let d = TmpDir::new("atomic");
        let blob = d.blob();
        let json = manifest_path(&blob);
        assert_eq!(json, d.0.join("weights.bin.json"));
        let partial = d.0.join("weights.bin.partial");
        let json_partial = d.0.join("weights.bin.json.partial");
        let mut wr = WeightWriter::create(&blob).unwrap();
        wr.add_raw("a", "u8", &[3], &[1, 2, 3]).unwrap();
        assert!(partial.exists());
        assert!(!blob.exists() && !json.exists());
        wr.finish().unwrap();
        assert!(blob.exists() && json.exists());
        assert!(!partial.exists() && !json_partial.exists());

        // A dropped writer leaves the previous complete file untouched and no partials.
        let mut wr = WeightWriter::create(&blob).unwrap();
        wr.add_raw("b", "u8", &[2], &[9, 9]).unwrap();
        drop(wr);
        assert!(!partial.exists() && !json_partial.exists());
        let wf = WeightFile::open(&blob).unwrap();
        assert_eq!(wf.tensor_names().collect::<Vec<_>>(), ["a"]);
        drop(wf);

        // Finishing again replaces both files.
        let mut wr = WeightWriter::create(&blob).unwrap();
        wr.add_raw("b", "u8", &[2], &[9, 9]).unwrap();
        wr.finish().unwrap();
        let wf = WeightFile::open(&blob).unwrap();
        assert_eq!(wf.tensor_names().collect::<Vec<_>>(), ["b"]);
        assert_eq!(wf.tensor_bytes("b").unwrap(), &[9, 9]);
    }

    #[test]
    fn writer_rejects_bad_input() {
        let d = TmpDir::new("wbad");
        let mut wr = WeightWriter::create(&d.blob()).unwrap();
        assert!(msg(wr.add_raw("x", "f64", &[1], &[0; 8])).contains("unknown dtype `f64`"));
        assert!(msg(wr.add_raw("x", "f32", &[3], &[0; 8])).contains("8 bytes given"));
        assert!(msg(wr.add_raw("x", "u8", &[u64::MAX, 4], &[])).contains("more than 2^64"));
        assert!(msg(wr.add_raw("", "u8", &[0], &[])).contains("empty tensor name"));
        wr.add_raw("x", "u8", &[1], &[1]).unwrap();
        assert!(msg(wr.add_raw("x", "u8", &[1], &[1])).contains("added twice"));
        let q = quantize(QuantInput::F32(&[0.5; 64]), 1, 64, 64, 4).unwrap();
        assert!(msg(wr.add_quantized("m", &q, 2, 64, 64, 4)).contains("packed words"));
        assert!(msg(wr.add_quantized("m", &q, 1, 64, 64, 5)).contains("unsupported bits"));
        wr.add_quantized("m", &q, 1, 64, 64, 4).unwrap();
        assert!(msg(wr.add_quantized("m", &q, 1, 64, 64, 4)).contains("`m.weight` added twice"));
        wr.finish().unwrap();
        WeightFile::open(&d.blob()).unwrap();
    }

    #[test]
    fn open_errors() {
        let d = TmpDir::new("errs");
        let blob = d.blob();
        let jp = manifest_path(&blob);
        let reset = || {
            write_sample(&blob);
            WeightFile::open(&blob).unwrap();
        };
        let open = || msg(WeightFile::open(&blob));

        reset();
        fs::remove_file(&jp).unwrap();
        assert!(open().contains("cannot read manifest"));

        reset();
        let json = fs::read(&jp).unwrap();
        fs::write(&jp, &json[..json.len() / 2]).unwrap();
        let e = open();
        assert!(
            e.contains("bad manifest") && e.contains(&blob.display().to_string()),
            "{e}"
        );

        reset();
        fs::write(&jp, b"\x00\xffnot json").unwrap();
        assert!(open().contains("bad manifest"));

        reset();
        edit_manifest(&blob, |v| v["format"] = "safetensors".into());
        assert!(open().contains("format is `safetensors`"));

        reset();
        edit_manifest(&blob, |v| v["version"] = 2.into());
        assert!(open().contains("version 2"));

        reset();
        let len = fs::metadata(&blob).unwrap().len();
        File::options()
            .write(true)
            .open(&blob)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let e = open();
        assert!(
            e.contains(&format!("blob is {} bytes", len - 1)) && e.contains(&len.to_string()),
            "{e}"
        );

        reset();
        edit_manifest(&blob, |v| {
            let t = &mut v["tensors"]["odd.bytes"];
            t["offset"] = (len + 64 - len % 64).into();
        });
        let e = open();
        assert!(
            e.contains("tensor `odd.bytes`") && e.contains("exceed the blob"),
            "{e}"
        );

        reset();
        edit_manifest(&blob, |v| {
            v["tensors"]["odd.bytes"]["offset"] = u64::MAX.into()
        });
        assert!(open().contains("tensor `odd.bytes`"));

        reset();
        edit_manifest(&blob, |v| {
            v["tensors"]["model.norm.weight"]["offset"] = 4.into()
        });
        let e = open();
        assert!(
            e.contains("tensor `model.norm.weight`: offset 4 is not 64-byte aligned"),
            "{e}"
        );

        reset();
        edit_manifest(&blob, |v| {
            v["tensors"]["model.norm.weight"]["size"] = 48.into()
        });
        let e = open();
        assert!(e.contains("size 48 but shape [13] of f32 needs 52"), "{e}");

        reset();
        edit_manifest(&blob, |v| v["tensors"]["odd.bytes"]["dtype"] = "i8".into());
        assert!(open().contains("tensor `odd.bytes`: unknown dtype `i8`"));

        reset();
        edit_manifest(&blob, |v| {
            v["tensors"]["layer.proj.weight"]
                .as_object_mut()
                .unwrap()
                .remove("bits");
        });
        assert!(open().contains("bits and group_size must be given together"));

        reset();
        edit_manifest(&blob, |v| {
            let t = v["tensors"]["layer.proj.weight"].as_object_mut().unwrap();
            t.remove("bits");
            t.remove("group_size");
        });
        assert!(open().contains("packed u32 weight without bits/group_size"));

        reset();
        edit_manifest(&blob, |v| {
            v["tensors"]["layer.proj.weight"]["bits"] = 5.into()
        });
        assert!(open().contains("bits = 5 not supported"));

        reset();
        edit_manifest(&blob, |v| {
            v["tensors"]["layer.proj.weight"]["group_size"] = 256.into()
        });
        assert!(open().contains("group_size = 256 not supported"));

        reset();
        edit_manifest(&blob, |v| v["tensors"]["odd.bytes"]["bits"] = 4.into());
        assert!(open().contains("bits and group_size must be given together"));

        // Quantized triplets are checked at open.
        reset();
        edit_manifest(&blob, |v| {
            v["tensors"]
                .as_object_mut()
                .unwrap()
                .remove("layer.proj.biases");
        });
        assert!(open().contains("no tensor `layer.proj.biases`"));

        reset();
        edit_manifest(&blob, |v| {
            v["tensors"]["layer.proj.scales"]["shape"] = serde_json::json!([12, 1])
        });
        let e = open();
        assert!(e.contains("scales shape [12, 1], expected [6, 2]"), "{e}");

        reset();
        edit_manifest(&blob, |v| {
            v["tensors"]["layer.proj.biases"]["dtype"] = "u8".into()
        });
        edit_manifest(&blob, |v| {
            v["tensors"]["layer.proj.biases"]["size"] = 12.into()
        });
        assert!(open().contains("biases are u8 but scales are bf16"));

        reset();
        edit_manifest(&blob, |v| {
            v["tensors"]["layer.proj.scales"]["dtype"] = "u8".into()
        });
        edit_manifest(&blob, |v| {
            v["tensors"]["layer.proj.scales"]["size"] = 12.into()
        });
        assert!(open().contains("scales dtype is u8"));

        // Missing tensors on a valid file.
        reset();
        let wf = WeightFile::open(&blob).unwrap();
        assert!(msg(wf.tensor("nope")).contains("no tensor `nope`"));
        assert!(msg(wf.tensor_bytes("nope")).contains("no tensor `nope`"));
        assert!(msg(wf.weight_ref("model.norm")).contains("no tensor `model.norm.scales`"));
        assert!(msg(wf.weight_ref("other")).contains("no tensor `other.weight`"));
    }

    #[test]
    fn weight_file_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<WeightFile>();
    }
}
