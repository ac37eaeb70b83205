//! Linker shim for the host route: rustc links the eBPF crate as an x86_64 `cdylib` made
//! of LLVM bitcode (`-C linker-plugin-lto`) and calls this binary as its linker. The shim
//! keeps the output path, the bitcode inputs and the exported symbols (from rustc's
//! version script) and hands them to bpf-linker, which retargets the bitcode to BPF.

use std::{env, fs, path::Path, process::Command};

/// Set by `build::build_ebpf_host` to the bpf-linker to call; its presence means this
/// process was started by rustc as a linker.
pub const LINKER_ENV: &str = "SPLITTER_BPF_LINKER";

/// Returns the exit code if this process was started as the linker shim.
pub fn run_if_invoked_as_linker() -> Option<i32> {
    let bpf_linker = env::var_os(LINKER_ENV)?;
    let args = expand_response_files(env::args().skip(1));
    let plan = match LinkPlan::from_args(&args) {
        Ok(plan) => plan,
        Err(msg) => {
            eprintln!("splitter link shim: {msg} (arguments: {args:?})");
            return Some(1);
        }
    };
    let mut cmd = Command::new(bpf_linker);
    cmd.args(["--target", "bpfel", "--btf", "-o"]).arg(&plan.output);
    if !plan.exports.is_empty() {
        cmd.arg("--export").arg(plan.exports.join(","));
    }
    cmd.args(&plan.inputs);
    match cmd.status() {
        Ok(st) => Some(st.code().unwrap_or(1)),
        Err(e) => {
            eprintln!("splitter link shim: cannot run bpf-linker: {e}");
            Some(1)
        }
    }
}

/// What the shim keeps from a gcc-flavoured rustc link line.
#[derive(Debug, Default, PartialEq)]
struct LinkPlan {
    output: String,
    inputs: Vec<String>,
    exports: Vec<String>,
}

impl LinkPlan {
    fn from_args(args: &[String]) -> Result<Self, String> {
        let mut plan = LinkPlan::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            if arg == "-o" {
                plan.output = it.next().ok_or("-o without a path")?.clone();
            } else if let Some(script) = arg.strip_prefix("-Wl,--version-script=") {
                let text = fs::read_to_string(script).map_err(|e| format!("cannot read version script {script}: {e}"))?;
                plan.exports = exported_symbols(&text);
            } else if is_bitcode_input(arg) {
                plan.inputs.push(arg.clone());
            }
        }
        if plan.output.is_empty() {
            return Err("no -o output in the link line".into());
        }
        if plan.inputs.is_empty() {
            return Err("no object or rlib inputs in the link line".into());
        }
        Ok(plan)
    }
}

/// Object files and rlibs carry bitcode; rustc's generated `symbols.o` is a native
/// object whose only job is keeping symbols alive, which `--export` does here.
fn is_bitcode_input(arg: &str) -> bool {
    if arg.starts_with('-') {
        return false;
    }
    let name = Path::new(arg).file_name().and_then(|n| n.to_str()).unwrap_or("");
    (name.ends_with(".o") && name != "symbols.o") || name.ends_with(".rlib")
}

/// Symbols between `global:` and `local:` in a GNU ld version script.
fn exported_symbols(script: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_global = false;
    for token in script.split(|c: char| c.is_whitespace() || c == ';' || c == '{' || c == '}') {
        match token {
            "" => {}
            "global:" => in_global = true,
            "local:" => in_global = false,
            sym if in_global => out.push(sym.to_string()),
            _ => {}
        }
    }
    out
}

/// rustc passes `@file` when the command line is long; each line is one argument.
fn expand_response_files(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    for arg in args {
        match arg.strip_prefix('@').map(fs::read_to_string) {
            Some(Ok(text)) => out.extend(text.lines().map(str::to_string)),
            _ => out.push(arg),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_script_exports() {
        let script = "{\n  global:\n    splitter;\n    PACKET_COUNTERS;\n\n  local:\n    *;\n};\n";
        assert_eq!(exported_symbols(script), ["splitter", "PACKET_COUNTERS"]);
    }

    #[test]
    fn link_line_keeps_bitcode_inputs_and_output() {
        let args: Vec<String> = [
            "-m64",
            "/tmp/rustcX/symbols.o",
            "/t/deps/splitter_ebpf.splitter_ebpf.abc-cgu.0.rcgu.o",
            "/t/deps/libaya_ebpf-123.rlib",
            "-Wl,-Bdynamic",
            "-lgcc_s",
            "-o",
            "/t/deps/libsplitter_ebpf.so",
            "-shared",
        ]
        .map(String::from)
        .to_vec();
        let plan = LinkPlan::from_args(&args).unwrap();
        assert_eq!(plan.output, "/t/deps/libsplitter_ebpf.so");
        assert_eq!(plan.inputs, ["/t/deps/splitter_ebpf.splitter_ebpf.abc-cgu.0.rcgu.o", "/t/deps/libaya_ebpf-123.rlib"]);
    }
}
