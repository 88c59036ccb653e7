//! The provider simulator binary (issue 3).
fn main() {
    eprintln!("gpupool-sim: not built yet");
    std::process::exit(2);
}
