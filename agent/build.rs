//! Builds the eBPF programs (crate `mcpwarden-ebpf`, nightly toolchain, `bpfel-unknown-none`) and
//! leaves the object in OUT_DIR, where `redirect` embeds it with `include_bytes_aligned!`. One
//! `cargo build` therefore yields one self-contained `mcpwarden` binary.
//! `cargo xtask setup` installs what this needs (rust-src for nightly, bpf-linker).
fn main() -> anyhow::Result<()> {
    let ebpf_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?
        .to_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mcpwarden-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
