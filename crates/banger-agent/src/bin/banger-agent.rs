//! The guest agent; everything is in the library.

fn main() -> std::process::ExitCode {
    banger_agent::main()
}
