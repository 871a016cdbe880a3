//! Mechanical MSL -> C++17 rewriter for the CPU emulator (used by `build.rs`; std only).
//!
//! Input is preprocessed MSL (with `# N "file"` line markers), output is C++ that compiles against
//! `emu/include/msl_cpu.h` with the same line structure (markers become `#line`), so compiler
//! diagnostics and runtime errors point at `.metal` lines. What it does, token by token:
//! kernel parameter attributes become default arguments (`[[buffer(0)]]` ->
//! `= ::msl_emu::buffer_arg{0, ...}`, builtins -> `= ::msl_emu::bi::name()`), unannotated kernel
//! parameters get the lowest free buffer index, `template [[host_name("x")]] ... f<T>;` lines
//! become registry entries, address-space keywords are erased (`constant` -> `const`),
//! `threadgroup T x[N];` becomes a reference into the per-group arena, multi-component swizzles
//! become member-template calls, and floating literals get MSL's types (`0.5` is a float, `0.5h`
//! a half). Anything it cannot translate faithfully is an error, never a silent change.

#![allow(dead_code)]

use std::fmt::Write as _;

/// A kernel the translated file registers: `name` (the `[[host_name]]` or function name) runs
/// the C++ expression `expr` called with no arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelEntry {
    pub name: String,
    pub expr: String,
    pub file: String,
    pub line: u32,
}

/// A construct the rewriter refuses, at a `.metal` location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RewriteError {
    pub file: String,
    pub line: u32,
    pub msg: String,
}

impl std::fmt::Display for RewriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: error: {}", self.file, self.line, self.msg)
    }
}

/// The translation of one preprocessed file.
#[derive(Debug)]
pub struct Translated {
    /// C++ source, without the shim include and without the registry function.
    pub cpp: String,
    pub kernels: Vec<KernelEntry>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ident,
    Number,
    Str,
    Char,
    Punct,
    Space,
    Newline,
    Directive,
}

#[derive(Clone, Debug)]
struct Tok<'a> {
    kind: Kind,
    text: &'a str,
    line: u32,
    file: usize,
}

const PUNCTS: [&str; 26] = [
    ">>=", "<<=", "...", "->*", "::", "->", "++", "--", "<<", ">>", "<=", ">=", "==", "!=", "&&",
    "||", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "##", ".*",
];

const ASSIGN_OPS: [&str; 11] = [
    "=", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "<<=", ">>=",
];

/// Builtin parameter attributes, each read from the current emulated thread.
pub const BUILTINS: [&str; 19] = [
    "thread_position_in_grid",
    "thread_position_in_threadgroup",
    "threadgroup_position_in_grid",
    "threads_per_threadgroup",
    "threadgroups_per_grid",
    "threads_per_grid",
    "dispatch_threads_per_threadgroup",
    "grid_size",
    "grid_origin",
    "thread_index_in_threadgroup",
    "thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup",
    "dispatch_simdgroups_per_threadgroup",
    "threads_per_simdgroup",
    "thread_execution_width",
    "thread_index_in_quadgroup",
    "quadgroup_index_in_threadgroup",
    "quadgroups_per_threadgroup",
];

const KEPT_ATTRS: [&str; 7] = [
    "maybe_unused",
    "likely",
    "unlikely",
    "fallthrough",
    "nodiscard",
    "noreturn",
    "deprecated",
];

struct Lexed<'a> {
    toks: Vec<Tok<'a>>,
    files: Vec<String>,
}

fn lex(src: &str) -> Lexed<'_> {
    let b = src.as_bytes();
    let mut toks = Vec::new();
    let mut files = vec![String::from("<input>")];
    let (mut i, mut line, mut file) = (0usize, 1u32, 0usize);
    let mut line_start = true;
    while i < b.len() {
        let c = b[i];
        let start = i;
        let kind;
        if c == b'\n' {
            i += 1;
            kind = Kind::Newline;
        } else if c == b' ' || c == b'\t' || c == b'\r' || c == 0x0c {
            while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\r' | 0x0c) {
                i += 1;
            }
            kind = Kind::Space;
        } else if c == b'#' && line_start {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            kind = Kind::Directive;
        } else if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            kind = Kind::Space;
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i = (i + 2).min(b.len());
            kind = Kind::Space;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            kind = Kind::Ident;
        } else if c.is_ascii_digit()
            || (c == b'.' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            i += 1;
            while i < b.len() {
                let d = b[i];
                if (d == b'+' || d == b'-') && matches!(b[i - 1], b'e' | b'E' | b'p' | b'P') {
                    let hex = src[start..i].starts_with("0x") || src[start..i].starts_with("0X");
                    let exp_char = matches!(b[i - 1], b'p' | b'P') || !hex;
                    if exp_char {
                        i += 1;
                        continue;
                    }
                    break;
                }
                if d.is_ascii_alphanumeric() || d == b'_' || d == b'.' || d == b'\'' {
                    i += 1;
                } else {
                    break;
                }
            }
            kind = Kind::Number;
        } else if c == b'"' || c == b'\'' {
            i += 1;
            while i < b.len() && b[i] != c && b[i] != b'\n' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i = (i + 1).min(b.len());
            kind = if c == b'"' { Kind::Str } else { Kind::Char };
        } else {
            let rest = &src[i..];
            let p = PUNCTS.iter().find(|p| rest.starts_with(**p));
            i += p.map_or(1, |p| p.len());
            while !src.is_char_boundary(i) {
                i += 1;
            }
            kind = Kind::Punct;
        }
        let text = &src[start..i];
        toks.push(Tok {
            kind,
            text,
            line,
            file,
        });
        match kind {
            Kind::Newline => {
                line = line.wrapping_add(1);
                line_start = true;
            }
            Kind::Space => line += text.matches('\n').count() as u32,
            Kind::Directive => {
                if let Some((n, f)) = parse_marker(text) {
                    // The marker names the line that follows it.
                    line = n.wrapping_sub(1);
                    file = files.iter().position(|x| *x == f).unwrap_or_else(|| {
                        files.push(f.clone());
                        files.len() - 1
                    });
                }
            }
            _ => line_start = false,
        }
    }
    Lexed { toks, files }
}

/// `# 12 "file.metal" 2` -> (12, "file.metal").
fn parse_marker(d: &str) -> Option<(u32, String)> {
    let rest = d.strip_prefix('#')?.trim_start();
    let rest = rest.strip_prefix("line").unwrap_or(rest).trim_start();
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    let n: u32 = rest[..end].parse().ok()?;
    let rest = rest[end..].trim_start().strip_prefix('"')?;
    let close = rest.find('"')?;
    Some((n, rest[..close].to_string()))
}

fn swizzle_indices(s: &str) -> Option<Vec<u8>> {
    if !(2..=4).contains(&s.len()) {
        return None;
    }
    let pick = |set: &str| -> Option<Vec<u8>> {
        s.chars().map(|c| set.find(c).map(|i| i as u8)).collect()
    };
    pick("xyzw").or_else(|| pick("rgba"))
}

/// The rewritten form of a numeric literal, or an error message.
fn rewrite_number(t: &str) -> Result<Option<String>, String> {
    let lower = t.to_ascii_lowercase();
    let hex = lower.starts_with("0x");
    let is_float = if hex {
        lower.contains('p')
    } else {
        lower.contains('.') || lower.contains('e')
    };
    if !is_float {
        return Ok(None);
    }
    let last = lower.chars().last().unwrap_or('0');
    let (body, suffix) = match last {
        'f' | 'h' | 'l' => (&t[..t.len() - 1], last),
        _ => (t, ' '),
    };
    match suffix {
        'f' => Ok(None),
        'h' => Ok(Some(format!("::msl_emu::half_lit({body}f)"))),
        'l' => Err(format!("`{t}`: MSL has no long double")),
        _ => Ok(Some(format!("{body}f"))),
    }
}

struct Pending {
    templated: bool,
    host_name: Option<String>,
}

struct Rw<'a> {
    toks: Vec<Tok<'a>>,
    files: Vec<String>,
    sig: Vec<usize>,
    rep: Vec<Option<String>>,
    errors: Vec<RewriteError>,
    kernels: Vec<KernelEntry>,
    tu: u32,
    sites: u32,
}

impl<'a> Rw<'a> {
    fn t(&self, p: usize) -> &Tok<'a> {
        &self.toks[self.sig[p]]
    }
    fn text(&self, p: usize) -> &'a str {
        self.toks[self.sig[p]].text
    }
    fn is(&self, p: usize, s: &str) -> bool {
        p < self.sig.len() && self.text(p) == s
    }
    fn set(&mut self, p: usize, s: impl Into<String>) {
        let i = self.sig[p];
        self.rep[i] = Some(s.into());
    }
    /// Blank every token (significant or not, except newlines) from sig position a to b inclusive.
    fn blank(&mut self, a: usize, b: usize) {
        for i in self.sig[a]..=self.sig[b] {
            if self.toks[i].kind != Kind::Newline {
                self.rep[i] = Some(String::new());
            }
        }
    }
    fn err(&mut self, p: usize, msg: impl Into<String>) {
        let t = self.t(p.min(self.sig.len() - 1));
        let e = RewriteError {
            file: self.files[t.file].clone(),
            line: t.line,
            msg: msg.into(),
        };
        self.errors.push(e);
    }
    fn loc(&self, p: usize) -> (String, u32) {
        let t = self.t(p);
        (self.files[t.file].clone(), t.line)
    }
    /// Source text of sig positions a..b (exclusive), trivia included, newlines as spaces.
    fn src(&self, a: usize, b: usize) -> String {
        if a >= b {
            return String::new();
        }
        let mut s = String::new();
        for i in self.sig[a]..=self.sig[b - 1] {
            let tk = &self.toks[i];
            match tk.kind {
                Kind::Newline | Kind::Directive => s.push(' '),
                _ => s.push_str(self.rep[i].as_deref().unwrap_or(tk.text)),
            }
        }
        s.trim().to_string()
    }
    /// Position of the bracket matching the opener at p (`(`, `[`, `{`), counting all three.
    fn matching(&self, p: usize) -> Option<usize> {
        let mut depth = 0i32;
        for q in p..self.sig.len() {
            match self.text(q) {
                "(" | "[" | "{" => depth += 1,
                ")" | "]" | "}" => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(q);
                    }
                }
                _ => {}
            }
        }
        None
    }
    /// Position just past the `>` closing the `<` at p (nested parens skipped, `>>` counts twice).
    fn matching_angle(&self, p: usize) -> Option<usize> {
        let mut depth = 0i32;
        let mut q = p;
        while q < self.sig.len() {
            match self.text(q) {
                "<" => depth += 1,
                ">" => depth -= 1,
                ">>" => depth -= 2,
                "(" | "[" | "{" => q = self.matching(q)?,
                ";" | "}" => return None,
                _ => {}
            }
            if depth <= 0 {
                return Some(q + 1);
            }
            q += 1;
        }
        None
    }
    /// An attribute `[[ ... ]]` starting at p: (position of the last `]`, name, argument text).
    fn attribute(&self, p: usize) -> Option<(usize, String, String)> {
        if !(self.is(p, "[") && self.is(p + 1, "[")) {
            return None;
        }
        let close = self.matching(p + 1)?;
        if !self.is(close + 1, "]") {
            return None;
        }
        let mut name = String::new();
        let mut q = p + 2;
        while q < close && (self.t(q).kind == Kind::Ident || self.is(q, "::")) {
            name.push_str(self.text(q));
            q += 1;
        }
        let args = if self.is(q, "(") {
            let e = self.matching(q).unwrap_or(close);
            self.src(q + 1, e)
        } else {
            String::new()
        };
        Some((close + 1, name, args))
    }
}

fn ns_prefix(stack: &[(String, i32)]) -> String {
    let mut s = String::new();
    for (n, _) in stack {
        if !n.is_empty() {
            s.push_str(n);
            s.push_str("::");
        }
    }
    s
}

/// Translate one preprocessed MSL file. `tu` numbers the translation unit (it keys threadgroup
/// declaration sites); `keep` filters which kernels are registered (a template kernel that is
/// not registered is never instantiated, which keeps large files cheap to compile).
pub fn rewrite(
    src: &str,
    tu: u32,
    keep: &dyn Fn(&str) -> bool,
) -> Result<Translated, Vec<RewriteError>> {
    let Lexed { toks, files } = lex(src);
    let sig: Vec<usize> = (0..toks.len())
        .filter(|&i| !matches!(toks[i].kind, Kind::Space | Kind::Newline | Kind::Directive))
        .collect();
    let n = toks.len();
    let mut rw = Rw {
        toks,
        files,
        sig,
        rep: vec![None; n],
        errors: Vec::new(),
        kernels: Vec::new(),
        tu,
        sites: 0,
    };
    run(&mut rw, keep);
    if !rw.errors.is_empty() {
        return Err(rw.errors);
    }
    let mut out = String::with_capacity(src.len() + src.len() / 4);
    for (i, tk) in rw.toks.iter().enumerate() {
        if let Some(r) = &rw.rep[i] {
            out.push_str(r);
        } else if tk.kind == Kind::Directive {
            match parse_marker(tk.text) {
                Some((line, file)) => {
                    let _ = write!(out, "#line {line} \"{}\"", file.replace('\\', "\\\\"));
                }
                None => out.push_str(tk.text),
            }
        } else {
            out.push_str(tk.text);
        }
    }
    Ok(Translated {
        cpp: out,
        kernels: rw.kernels,
    })
}

fn run(rw: &mut Rw<'_>, keep: &dyn Fn(&str) -> bool) {
    let ns_len = rw.sig.len();
    let mut p = 0usize;
    let mut depth = 0i32;
    let mut ns: Vec<(String, i32)> = Vec::new();
    let mut template_end: Option<usize> = None;
    let mut pending: Option<Pending> = None;
    let mut host_name: Option<String> = None;
    let mut consumed = vec![false; ns_len];
    while p < ns_len {
        if consumed[p] {
            p += 1;
            continue;
        }
        let tk = rw.t(p).clone();
        match (tk.kind, tk.text) {
            (Kind::Punct, "{") => depth += 1,
            (Kind::Punct, "}") => {
                if ns.last().is_some_and(|(_, d)| *d == depth) {
                    ns.pop();
                }
                depth -= 1;
            }
            (Kind::Ident, "namespace") if !(p > 0 && rw.is(p - 1, "using")) => {
                let mut q = p + 1;
                let mut name = String::new();
                while q < ns_len && (rw.t(q).kind == Kind::Ident || rw.is(q, "::")) {
                    name.push_str(rw.text(q));
                    q += 1;
                }
                if rw.is(q, "{") {
                    ns.push((name, depth + 1));
                }
            }
            (Kind::Ident, "template") => {
                if rw.is(p + 1, "<") {
                    template_end = rw.matching_angle(p + 1);
                } else {
                    p = explicit_instantiation(rw, p, &ns, keep);
                    continue;
                }
            }
            (Kind::Punct, "[") if rw.is(p + 1, "[") => {
                if let Some((end, name, args)) = rw.attribute(p) {
                    match name.as_str() {
                        "kernel" => {
                            pending = Some(Pending {
                                templated: template_end == Some(p),
                                host_name: host_name.take(),
                            });
                            rw.blank(p, end);
                        }
                        "host_name" => {
                            host_name = Some(args.trim_matches('"').to_string());
                            if let Some(pk) = pending.as_mut() {
                                pk.host_name = host_name.take();
                            }
                            rw.blank(p, end);
                            if template_end == Some(p) {
                                template_end = Some(end + 1);
                            }
                        }
                        "max_total_threads_per_threadgroup" | "buffer" | "threadgroup" => {
                            rw.blank(p, end)
                        }
                        n if BUILTINS.contains(&n) => rw.blank(p, end),
                        n if KEPT_ATTRS.contains(&n) || n.starts_with("gnu::") => {}
                        n => rw.err(
                            p,
                            format!("attribute [[{n}]] is not supported by the MSL emulator"),
                        ),
                    }
                    p = end + 1;
                    continue;
                }
            }
            (Kind::Ident, "kernel") => {
                pending = Some(Pending {
                    templated: template_end == Some(p),
                    host_name: host_name.take(),
                });
                rw.set(p, "");
                if template_end == Some(p) {
                    template_end = Some(p + 1);
                }
            }
            (Kind::Ident, "constant") => {
                let dup = (p > 0 && rw.is(p - 1, "const")) || rw.is(p + 1, "const");
                rw.set(p, if dup { "" } else { "const" });
            }
            (Kind::Ident, "device") | (Kind::Ident, "thread") => rw.set(p, ""),
            (Kind::Ident, "threadgroup") => threadgroup_decl(rw, p),
            (Kind::Ident, "double") => rw.err(p, "MSL has no `double`"),
            (Kind::Ident, "function_constant")
            | (Kind::Ident, "texture2d")
            | (Kind::Ident, "sampler") => rw.err(
                p,
                format!("`{}` is not supported by the MSL emulator", tk.text),
            ),
            (Kind::Ident, name) if pending.is_some() && rw.is(p + 1, "(") => {
                let pk = pending.take().unwrap_or(Pending {
                    templated: false,
                    host_name: None,
                });
                let close = match rw.matching(p + 1) {
                    Some(c) => c,
                    None => {
                        rw.err(p, "unterminated kernel parameter list");
                        return;
                    }
                };
                kernel_params(rw, p + 1, close, &mut consumed);
                if !pk.templated {
                    let reg = pk.host_name.unwrap_or_else(|| name.to_string());
                    if keep(&reg) {
                        let (file, line) = rw.loc(p);
                        rw.kernels.push(KernelEntry {
                            name: reg,
                            expr: format!("{}{}", ns_prefix(&ns), name),
                            file,
                            line,
                        });
                    }
                }
            }
            (Kind::Punct, "." | "->") if p + 1 < ns_len && rw.t(p + 1).kind == Kind::Ident => {
                if let Some(idx) = swizzle_indices(rw.text(p + 1)) {
                    let list = idx
                        .iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(", ");
                    let assigned = p + 2 < ns_len && ASSIGN_OPS.contains(&rw.text(p + 2));
                    let f = if assigned { "msl_swz_ref" } else { "msl_swz" };
                    rw.set(p + 1, format!("template {f}<{list}>()"));
                    p += 2;
                    continue;
                }
            }
            (Kind::Number, t) => match rewrite_number(t) {
                Ok(Some(s)) => rw.set(p, s),
                Ok(None) => {}
                Err(e) => rw.err(p, e),
            },
            _ => {}
        }
        p += 1;
    }
}

/// `template [[host_name("x")]] [[kernel]] decltype(f<T>) f<T>;` (or with a full signature):
/// becomes a registry entry; the statement itself is removed. Returns the position after `;`.
fn explicit_instantiation(
    rw: &mut Rw<'_>,
    p: usize,
    ns: &[(String, i32)],
    keep: &dyn Fn(&str) -> bool,
) -> usize {
    let mut q = p + 1;
    let mut host = None;
    let mut is_kernel = false;
    while let Some((end, name, args)) = rw.attribute(q) {
        match name.as_str() {
            "host_name" => host = Some(args.trim_matches('"').to_string()),
            "kernel" => is_kernel = true,
            _ => {}
        }
        q = end + 1;
    }
    if rw.is(q, "kernel") {
        is_kernel = true;
        q += 1;
    }
    if host.is_none() && !is_kernel {
        return p + 1; // an ordinary C++ explicit instantiation
    }
    let mut semi = q;
    while semi < rw.sig.len() && !rw.is(semi, ";") {
        if matches!(rw.text(semi), "(" | "[" | "{") {
            semi = rw.matching(semi).unwrap_or(rw.sig.len() - 1);
        }
        semi += 1;
    }
    if semi >= rw.sig.len() {
        rw.err(p, "unterminated kernel instantiation");
        return rw.sig.len();
    }
    // The instantiated template-id: after `decltype(...)`, or before the parameter list.
    let expr = if rw.is(q, "decltype") && rw.is(q + 1, "(") {
        let close = rw.matching(q + 1).unwrap_or(semi);
        rw.src(close + 1, semi)
    } else {
        let mut open = q;
        while open < semi && !rw.is(open, "(") {
            if rw.is(open, "<") {
                open = rw.matching_angle(open).unwrap_or(semi);
                continue;
            }
            open += 1;
        }
        // Walk back over `name<...>` (and `a::b::` qualifiers).
        let mut start = open;
        if start > q && (rw.is(start - 1, ">") || rw.is(start - 1, ">>")) {
            let mut d = 0i32;
            while start > q {
                start -= 1;
                match rw.text(start) {
                    ">" => d += 1,
                    ">>" => d += 2,
                    "<" => d -= 1,
                    _ => {}
                }
                if d == 0 {
                    break;
                }
            }
        }
        start = start.saturating_sub(1);
        while start >= q + 2 && rw.is(start - 1, "::") && rw.t(start - 2).kind == Kind::Ident {
            start -= 2;
        }
        rw.src(start, open)
    };
    let Some(name) = host else {
        rw.err(
            p,
            "an explicitly instantiated kernel needs [[host_name(\"...\")]]",
        );
        return semi + 1;
    };
    if expr.is_empty() {
        rw.err(p, "cannot find the instantiated kernel in this statement");
        return semi + 1;
    }
    if keep(&name) {
        let (file, line) = rw.loc(p);
        let expr = if expr.starts_with("::") {
            expr
        } else {
            format!("{}{}", ns_prefix(ns), expr)
        };
        rw.kernels.push(KernelEntry {
            name,
            expr,
            file,
            line,
        });
    }
    rw.blank(p, semi);
    semi + 1
}

/// Rewrite the parameter list `(` at `open` .. `)` at `close` of a kernel.
fn kernel_params(rw: &mut Rw<'_>, open: usize, close: usize, consumed: &mut [bool]) {
    // Split at top-level commas.
    let mut params: Vec<(usize, usize)> = Vec::new();
    let mut start = open + 1;
    let mut q = open + 1;
    let mut angle = 0i32;
    while q < close {
        match rw.text(q) {
            "(" | "[" | "{" => {
                if rw.is(q, "[") && rw.is(q + 1, "[") {
                    q = rw.matching(q + 1).map_or(close, |c| c + 1);
                } else {
                    q = rw.matching(q).unwrap_or(close);
                }
            }
            "<" => angle += 1,
            ">" => angle -= 1,
            ">>" => angle -= 2,
            "," if angle <= 0 => {
                params.push((start, q));
                start = q + 1;
            }
            _ => {}
        }
        q += 1;
    }
    if start < close {
        params.push((start, close));
    }
    if params.len() == 1 && params[0].1 == params[0].0 + 1 && rw.is(params[0].0, "void") {
        return;
    }
    let mut used = Vec::new();
    let mut implicit = Vec::new();
    for &(a, b) in &params {
        let mut bound = false;
        let mut q = a;
        while q < b {
            let Some((end, name, args)) = rw.attribute(q) else {
                q += 1;
                continue;
            };
            for c in consumed.iter_mut().take(end + 1).skip(q) {
                *c = true;
            }
            let repl = match name.as_str() {
                "buffer" | "threadgroup" => match args.trim().parse::<u32>() {
                    Ok(i) if i < 31 => {
                        bound = true;
                        if name == "buffer" {
                            used.push(i);
                            format!(" = ::msl_emu::buffer_arg{{{i}, __FILE__, __LINE__}}")
                        } else {
                            format!(" = ::msl_emu::tg_arg{{{i}, __FILE__, __LINE__}}")
                        }
                    }
                    _ => {
                        rw.err(
                            q,
                            format!("[[{name}({args})]]: index must be a literal in 0..31"),
                        );
                        String::new()
                    }
                },
                n if BUILTINS.contains(&n) => {
                    bound = true;
                    format!(" = ::msl_emu::bi::{n}()")
                }
                n if KEPT_ATTRS.contains(&n) => rw.src(q, end + 1),
                n => {
                    rw.err(q, format!("kernel parameter attribute [[{n}]] is not supported by the MSL emulator"));
                    String::new()
                }
            };
            rw.blank(q, end);
            rw.set(q, repl);
            q = end + 1;
        }
        if !bound {
            implicit.push(b - 1);
        }
    }
    // MSL numbers unannotated parameters with the lowest buffer indices not used explicitly.
    let mut next = 0u32;
    for last in implicit {
        while used.contains(&next) {
            next += 1;
        }
        let i = rw.sig[last];
        let prev = rw.rep[i]
            .clone()
            .unwrap_or_else(|| rw.toks[i].text.to_string());
        rw.rep[i] = Some(format!(
            "{prev} = ::msl_emu::buffer_arg{{{next}, __FILE__, __LINE__}}"
        ));
        used.push(next);
    }
}

/// `threadgroup` at p: a variable declaration at statement start becomes an arena reference;
/// anywhere else (pointer/reference types, casts, parameters) the keyword is erased.
fn threadgroup_decl(rw: &mut Rw<'_>, p: usize) {
    let stmt_start = p == 0 || matches!(rw.text(p - 1), "{" | "}" | ";" | ":");
    rw.set(p, "");
    if !stmt_start {
        return;
    }
    let mut semi = p + 1;
    let mut name_at = None;
    let mut pointer = false;
    let mut angle = 0i32;
    while semi < rw.sig.len() && !rw.is(semi, ";") {
        match rw.text(semi) {
            "<" => angle += 1,
            ">" => angle -= 1,
            ">>" => angle -= 2,
            "*" | "&" | "&&" if angle <= 0 && name_at.is_none() => pointer = true,
            "(" | "{" => semi = rw.matching(semi).unwrap_or(semi),
            "[" | "=" | "," if angle <= 0 && name_at.is_none() => name_at = Some(semi),
            _ => {}
        }
        semi += 1;
    }
    if pointer || semi >= rw.sig.len() {
        return;
    }
    let dims_at = name_at.unwrap_or(semi);
    match rw.text(dims_at) {
        "=" => return rw.err(p, "threadgroup variables cannot have initializers in MSL"),
        "," => {
            return rw.err(
                p,
                "declare one threadgroup variable per statement (the emulator needs it)",
            )
        }
        _ => {}
    }
    // Also refuse a comma between dims and `;`.
    for q in dims_at..semi {
        if rw.is(q, ",") || rw.is(q, "=") {
            return rw.err(
                p,
                "declare one threadgroup variable per statement, without initializer",
            );
        }
    }
    let name_p = dims_at - 1;
    if name_p <= p || rw.t(name_p).kind != Kind::Ident {
        return rw.err(p, "cannot parse this threadgroup declaration");
    }
    let ty = rw.src(p + 1, name_p);
    if ty.is_empty() {
        return rw.err(p, "cannot parse this threadgroup declaration");
    }
    let dims = rw.src(dims_at, semi);
    let name = rw.text(name_p).to_string();
    let site = (rw.tu << 16) | rw.sites;
    rw.sites += 1;
    rw.blank(p, semi - 1);
    rw.set(
        p,
        format!(
            "::msl_emu::tgdecl_t<{ty} {dims}>& {name} = ::msl_emu::tg_var<{ty} {dims}>({site}u, __FILE__, __LINE__)"
        ),
    );
}

/// The registry function for one translation unit.
pub fn registry_fn(tu: u32, kernels: &[KernelEntry]) -> String {
    let mut s = format!("\n#line 1 \"<msl_emu registry>\"\nvoid msl_emu_register_tu_{tu}() {{\n");
    for k in kernels {
        let _ = writeln!(
            s,
            "  msl_emu_add_kernel({:?}, [] {{ {}(); }}, {:?}, {});",
            k.name, k.expr, k.file, k.line
        );
    }
    s.push_str("}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(src: &str) -> Translated {
        rewrite(src, 1, &|_| true).unwrap_or_else(|e| panic!("{e:?}"))
    }

    #[test]
    fn kernel_params_become_defaults() {
        let t = rw("# 3 \"a.metal\"\nkernel void k(device float* x [[buffer(1)]], constant uint& n,\n uint3 gid [[thread_position_in_grid]]) {}\n");
        assert!(t.cpp.contains("#line 3 \"a.metal\""));
        assert!(
            t.cpp
                .contains("float* x  = ::msl_emu::buffer_arg{1, __FILE__, __LINE__}"),
            "{}",
            t.cpp
        );
        assert!(
            t.cpp
                .contains("const uint& n = ::msl_emu::buffer_arg{0, __FILE__, __LINE__}"),
            "{}",
            t.cpp
        );
        assert!(
            t.cpp
                .contains("gid  = ::msl_emu::bi::thread_position_in_grid()"),
            "{}",
            t.cpp
        );
        assert_eq!(
            t.kernels,
            vec![KernelEntry {
                name: "k".into(),
                expr: "k".into(),
                file: "a.metal".into(),
                line: 3
            }]
        );
        assert_eq!(t.cpp.lines().count(), 3);
    }

    #[test]
    fn host_name_instantiations_register() {
        let src = "namespace q {\ntemplate <typename T> [[kernel]] void f(device T* x [[buffer(0)]]) {}\n}\n\
                   template [[host_name(\"f_float\")]] [[kernel]] decltype(q::f<float>) q::f<float>;\n\
                   template [[host_name(\"f_half\")]] [[kernel]] void q::f<half>(device half* x [[buffer(0)]]);\n";
        let t = rw(src);
        let names: Vec<_> = t
            .kernels
            .iter()
            .map(|k| (k.name.as_str(), k.expr.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![("f_float", "q::f<float>"), ("f_half", "q::f<half>")]
        );
        assert!(!t.cpp.contains("host_name"));
    }

    #[test]
    fn threadgroup_declarations() {
        let t = rw("void f() { threadgroup float4 buf[2][N + 1]; threadgroup float* p = buf[0]; }");
        assert!(t.cpp.contains("::msl_emu::tgdecl_t<float4 [2][N + 1]>& buf = ::msl_emu::tg_var<float4 [2][N + 1]>(65536u"), "{}", t.cpp);
        assert!(t.cpp.contains(" float* p = buf[0];"), "{}", t.cpp);
        assert!(rewrite("void f() { threadgroup float a[2], b[2]; }", 0, &|_| true).is_err());
    }

    #[test]
    fn swizzles_literals_constants() {
        let t = rw("void f() { v.xy = w.zw * 0.5; x = 1.5h + 2.f + 1e3 + 0x1p4 + 7; const constant int c = 1; }");
        assert!(
            t.cpp
                .contains("v.template msl_swz_ref<0, 1>() = w.template msl_swz<2, 3>() * 0.5f"),
            "{}",
            t.cpp
        );
        assert!(
            t.cpp
                .contains("::msl_emu::half_lit(1.5f) + 2.f + 1e3f + 0x1p4f + 7"),
            "{}",
            t.cpp
        );
        assert!(t.cpp.contains("const  int c"), "{}", t.cpp);
        assert!(rewrite("double d;", 0, &|_| true).is_err());
    }

    #[test]
    fn implicit_indices_skip_explicit_ones() {
        let t =
            rw("kernel void k(device float* a, device float* b [[buffer(0)]], device float* c) {}");
        assert!(t.cpp.contains("a = ::msl_emu::buffer_arg{1,"), "{}", t.cpp);
        assert!(t.cpp.contains("c = ::msl_emu::buffer_arg{2,"), "{}", t.cpp);
    }

    #[test]
    fn unsupported_attribute_is_an_error() {
        let e = rewrite(
            "# 7 \"x.metal\"\nkernel void k(texture2d<float> t [[texture(0)]]) {}",
            0,
            &|_| true,
        )
        .unwrap_err();
        assert_eq!(e[0].line, 7);
        assert_eq!(e[0].file, "x.metal");
    }
}
