//! Command-line arguments (clap derive).

use std::path::PathBuf;

use clap::Parser;

/// banger's benchmark suite: every case in one run, each figure next to a
/// baseline measured in the same run and the goal it is held to.
#[derive(Debug, Parser)]
#[command(name = "banger-bench", version)]
pub struct Args {
    /// Each case a few times with tiny sizes: proves the suite still runs.
    /// Fails only when a case errors, never on a time.
    #[arg(long)]
    pub quick: bool,
    /// Print the results as JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Directory holding bangerd, banger, fake-firecracker and banger-agent
    /// (default: the directory of this executable).
    #[arg(long, value_name = "DIR", env = "BANGER_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Run only these cases (repeatable): create, concurrent, run,
    /// workspace, list, rss, clone, firecracker, qemu,
    /// snapshot.
    #[arg(long = "case", value_name = "CASE")]
    pub cases: Vec<String>,
    /// Real Firecracker binary for the `firecracker` case.
    #[arg(long, value_name = "PATH", env = "BANGER_BENCH_FIRECRACKER")]
    pub firecracker: Option<PathBuf>,
    /// Golden image (ext4) for the real-guest `qemu` case.
    #[arg(long, value_name = "PATH", env = "BANGER_GOLDEN_IMAGE")]
    pub golden_image: Option<PathBuf>,
    /// Static guest agent for real guests (scripts/build-agent.sh builds
    /// it; scripts/bench.sh passes it).
    #[arg(long, value_name = "PATH", env = "BANGER_AGENT_STATIC")]
    pub agent_static: Option<PathBuf>,
    /// Keep the work directory (daemon logs, state) after the run.
    #[arg(long)]
    pub keep: bool,
}
