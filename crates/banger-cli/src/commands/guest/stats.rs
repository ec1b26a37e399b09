//! `vm stats`: the guest's and its VMM's resource use.

use std::path::Path;

use banger_proto::{method, VmRef};

use crate::client::Client;
use crate::printer::Printer;

pub async fn stats(
    socket: &Path,
    printer: Printer,
    reference: &str,
    json: bool,
) -> anyhow::Result<()> {
    let stats = Client::connect(socket)
        .await?
        .call::<method::VmStats>(VmRef {
            vm: reference.to_owned(),
        })
        .await?;
    if json {
        printer.json(&stats);
        return Ok(());
    }
    let guest = &stats.guest;
    let mib = |bytes: u64| bytes / (1024 * 1024);
    printer.data(&format!(
        "vm         {}\nuptime     {:.0} s\nload       {:.2} {:.2} {:.2}\ncpus       {}\nmemory     {} MiB available of {} MiB\ndisk       {} MiB available of {} MiB\nvmm pid    {}\nvmm rss    {} MiB\nvmm cpu    {:.1} s ({} threads)",
        stats.vm.name,
        guest.uptime_seconds,
        guest.load_average[0],
        guest.load_average[1],
        guest.load_average[2],
        guest.cpu_count,
        mib(guest.memory_available_bytes),
        mib(guest.memory_total_bytes),
        mib(guest.disk_available_bytes),
        mib(guest.disk_total_bytes),
        stats.vmm.pid,
        mib(stats.vmm.rss_bytes),
        stats.vmm.cpu_seconds,
        stats.vmm.threads,
    ));
    Ok(())
}
