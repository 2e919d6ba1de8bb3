//! `tandem-replica <cloud.toml>`: one cloud replica, as `tandem cloud serve --config` runs it,
//! without the CLI's other dependencies — what the scale-out tests start, stop and SIGKILL
//! behind HAProxy (`cloud/tests/scaleout.rs`).
//!
//! Prints `listening <tls addr> metrics <http addr or ->` on stdout once it accepts
//! connections; stops gracefully on SIGINT or SIGTERM. Errors at start-up go to stderr.
#![forbid(unsafe_code)]

use std::io::Write as _;

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(config), None) = (args.next(), args.next()) else {
        eprintln!("usage: tandem-replica <cloud.toml>");
        return std::process::ExitCode::from(2);
    };
    let run = || -> Result<(), tandem_cloud::CloudError> {
        let opts = tandem_cloud::CloudToml::load(std::path::Path::new(&config))?.into_options()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let cloud = tandem_cloud::Cloud::start(opts).await?;
            let metrics = cloud
                .metrics_addr()
                .map_or_else(|| "-".to_string(), |a| a.to_string());
            println!("listening {} metrics {metrics}", cloud.local_addr());
            let _ = std::io::stdout().flush();
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            cloud.shutdown().await;
            Ok(())
        })
    };
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem-replica: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
