//! The input flags every example that loads Kubernetes input takes, and
//! their translation into `svclb::k8s::loader::LoadOptions` and a node
//! topology: `--service-cidr`, `--service-node-port-range`, `--node`,
//! `--zone`, `--keep-going`, `--verbose` and the `--max-*` limits (the same names and defaults as
//! `examples/svclb.rs`); and the node's addresses, `--node-ip` and
//! `--nodeport-addresses`, that node ports answer on.

use std::net::IpAddr;

use clap::Args;
use svclb::k8s::input::InputLimits;
use svclb::k8s::loader::{self, LoadOptions};
use svclb::render::Cidr;
use svclb::{DataplaneConfig, NodeTopology, ValidationError};

/// The node's address flags.
#[derive(Debug, Clone, Args)]
pub(crate) struct NodeAddrArgs {
    /// A node IP: node ports answer on it, traffic from it is the node's
    /// own. Repeatable.
    #[arg(long = "node-ip", action = clap::ArgAction::Append, value_name = "IP")]
    pub(crate) node_ip: Vec<IpAddr>,
    /// kube-proxy's --nodeport-addresses: node ports answer only on the
    /// node IPs inside these prefixes.
    #[arg(long = "nodeport-addresses", value_name = "CIDR[,CIDR]")]
    pub(crate) nodeport_addresses: Option<String>,
}

impl NodeAddrArgs {
    /// Sets `config.node_ips` and `config.nodeport_addresses`.
    pub(crate) fn apply(&self, config: &mut DataplaneConfig) -> Result<(), ValidationError> {
        config.node_ips = self.node_ip.clone();
        if let Some(list) = &self.nodeport_addresses {
            for part in list.split(',') {
                config
                    .nodeport_addresses
                    .push(Cidr::parse("--nodeport-addresses", part.trim())?);
            }
        }
        Ok(())
    }
}

/// The loader's flags.
#[derive(Debug, Clone, Args)]
pub(crate) struct LoadArgs {
    /// This node's name (Local traffic policies, node hints).
    #[arg(long)]
    pub(crate) node: Option<String>,
    /// This node's zone (topology hints).
    #[arg(long)]
    pub(crate) zone: Option<String>,
    /// Service CIDRs (one per family) that Services without
    /// spec.clusterIP get an address from.
    #[arg(long, default_value = loader::DEFAULT_SERVICE_CIDRS)]
    pub(crate) service_cidr: String,
    /// Skip bad objects (each reported) and load the rest.
    #[arg(long)]
    pub(crate) keep_going: bool,
    /// One note per skipped object instead of a summary per kind.
    #[arg(long)]
    pub(crate) verbose: bool,
    /// Bytes per input file or stream.
    #[arg(long, default_value_t = InputLimits::DEFAULT_MAX_BYTES)]
    pub(crate) max_input_bytes: u64,
    /// Nesting depth of lists and objects.
    #[arg(long, default_value_t = InputLimits::DEFAULT_MAX_DEPTH)]
    pub(crate) max_depth: usize,
    /// Documents per input.
    #[arg(long, default_value_t = InputLimits::DEFAULT_MAX_DOCUMENTS)]
    pub(crate) max_documents: usize,
    /// Objects per input (documents, list items, watch events).
    #[arg(long, default_value_t = InputLimits::DEFAULT_MAX_OBJECTS)]
    pub(crate) max_objects: usize,
    /// Bad objects reported per input (the rest are counted).
    #[arg(long, default_value_t = 20)]
    pub(crate) max_errors: usize,
    /// The API server's --service-node-port-range (LOW-HIGH or
    /// BASE+SIZE) that every spec.ports[].nodePort must fall in.
    #[arg(long, default_value = "30000-32767", value_name = "LOW-HIGH")]
    pub(crate) service_node_port_range: String,
}

impl LoadArgs {
    /// The loader's options.
    pub(crate) fn options(&self) -> Result<LoadOptions, ValidationError> {
        Ok(LoadOptions {
            service_cidrs: loader::parse_service_cidrs(&self.service_cidr)?,
            keep_going: self.keep_going,
            verbose: self.verbose,
            limits: InputLimits {
                max_bytes: self.max_input_bytes,
                max_depth: self.max_depth,
                max_documents: self.max_documents,
                max_objects: self.max_objects,
            },
            max_errors: self.max_errors,
            node_port_range: loader::parse_node_port_range(&self.service_node_port_range)?,
        })
    }

    /// The node's name and zone.
    pub(crate) fn node(&self) -> NodeTopology {
        let mut node = NodeTopology::default();
        node.node_name = self.node.clone();
        node.zone = self.zone.clone();
        node
    }
}
