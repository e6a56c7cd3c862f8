//! `ferrite rpc-server`: serves one device of this machine (the CPU by default) over ggml's RPC protocol, so that
//! `--rpc HOST:PORT` on another ferrite (or llama.cpp) process can place part of a model on it.

use std::net::IpAddr;

use anyhow::Result;
use clap::Args;
use ferrite::ggml::{rpc, Device};

use super::Hinted;

#[derive(Args, Debug)]
pub struct RpcServerArgs {
    /// Address to listen on. Anything but a loopback address exposes the device to the network: the protocol has
    /// no authentication.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// TCP port to listen on.
    #[arg(long, default_value_t = 50052)]
    pub port: u16,
    /// Compute threads of the served device [default: all available cores].
    #[arg(short = 't', long = "threads", value_name = "N")]
    pub threads: Option<usize>,
    /// The device to serve (`CPU`, `CUDA0`, ...; see `ferrite complete --list-devices`) [default: CPU].
    #[arg(long, value_name = "NAME")]
    pub device: Option<String>,
    /// Load ggml backend modules (libggml-cuda.so, ...) from this folder, to serve their devices; repeatable (the
    /// executable's folder is searched too).
    #[arg(long = "backend-dir", value_name = "DIR")]
    pub backend_dir: Vec<std::path::PathBuf>,
}

pub fn run(args: &RpcServerArgs) -> Result<()> {
    super::model_arg::load_backend_modules(&args.backend_dir)?;
    let device = match &args.device {
        None => Device::cpu(),
        Some(name) => Device::by_name(name),
    };
    let Some(device) = device else {
        let names: Vec<String> = Device::all()
            .iter()
            .filter(|d| !d.is_rpc())
            .map(|d| d.name())
            .collect();
        return Err(Hinted::new(
            format!(
                "there is no device named {}",
                args.device.as_deref().unwrap_or("CPU")
            ),
            format!("this machine has: {}", names.join(", ")),
        )
        .into());
    };
    let loopback = match args.host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => args.host == "localhost",
    };
    if !loopback {
        eprintln!(
            "ferrite: warning: listening on {} exposes device {} to the network: the RPC protocol has no \
             authentication or encryption, anyone who can reach the port can use the device and read its memory; \
             bind 127.0.0.1 (the default) unless the network is trusted",
            args.host,
            device.name()
        );
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let host = match args.host.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
        _ => args.host.clone(),
    };
    let endpoint = format!("{host}:{}", args.port);
    rpc::start_server(&endpoint, device, threads)?;
    Ok(())
}
